"""`srae data synth|pack|inspect|verify` (main registers them, with `data npz`, on the `data` group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import PackedArg, QuietOpt, float_option, int_option

HELP = "Make, pack, inspect and verify training data."
SYNTH_EPILOG = "Example: srae data synth shapes --n 2000 --image-size 64"
PACK_EPILOG = (
    "Examples: srae data pack shapes/conversations.jsonl --out packed · "
    "srae data pack photos/ --task generation --image-size 256 --codec jpg --workers 2 --out packed · "
    "srae data pack 'blip3o/{00000..00009}.tar' --task generation --out packed · "
    "srae data pack llava_v1_5_mix665k.json --image-root /data/llava --out packed · "
    "srae data pack hf:ORG/NAME --split train --out packed"
)
INSPECT_EPILOG = "Example: srae data inspect packed --samples 5"
VERIFY_EPILOG = "Example: srae data verify packed"


def synth(
    out: Annotated[Path, typer.Argument(help="Empty output folder.")],
    n: Annotated[int, int_option("--n", help="Images in total; a --heldout fraction of them go to heldout/.")] = 2000,
    image_size: Annotated[int, int_option("--image-size", help="Image side in pixels (16–256 and up).")] = 64,
    seed: Annotated[int, int_option("--seed", help="Same seed, same bytes.")] = 0,
    heldout: Annotated[float, float_option("--heldout", help="Fraction of images kept apart in heldout/ for evaluation.")] = 0.1,
) -> None:
    """Render the shapes world (coloured shapes with captions and Q/A) in every input format `data pack` reads."""
    from scale_rae_core.shapes.synth import synthesize

    s = synthesize(out, n, image_size=image_size, seed=seed, split_heldout=heldout)
    train, held = s["train"], s["heldout"]
    typer.echo(
        f"wrote the shapes world to {out}: {train['n']} training images ({train['n_conversations']} conversations), "
        f"{held['n']} held-out images in {held['root']}"
    )
    typer.echo(f"formats: captioned/ + captions.csv/.jsonl, conversations.jsonl, classes/ ({len(train['labels'])} labels)")
    typer.echo(f"next: srae data pack {out / 'conversations.jsonl'} --out {out.parent / (out.name + '-packed')}")


def pack(
    input: Annotated[str, typer.Argument(help="Folder of images (+ .txt captions, or class folders); a CSV / JSONL / JSON (LLaVA array) of captions or conversations; WebDataset .tar files, a folder of them or a brace pattern; .parquet files or a folder of them; a datasets save_to_disk folder; hf:REPO_ID (streamed; needs the datasets package).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for shards, wds_manifest.json and rejects.jsonl.")],
    format: Annotated[str | None, typer.Option("--format", help="captions | conversations | classes (default: detected).")] = None,
    task: Annotated[str, typer.Option("--task", help="For captions: generation | understanding | both.")] = "both",
    samples_per_shard: Annotated[int, int_option("--samples-per-shard", help="Samples per tar shard.")] = 1000,
    shard_bytes: Annotated[int, int_option("--shard-bytes", help="Start a new shard before a tar passes this size.")] = 1 << 30,
    image_size: Annotated[int | None, int_option("--image-size", help="Shrink so the longer side is at most this (default: keep).")] = None,
    codec: Annotated[str, typer.Option("--codec", help="png | jpg | webp.")] = "png",
    quality: Annotated[int, int_option("--quality", help="jpg/webp quality.")] = 95,
    workers: Annotated[int, int_option("--workers", help="Processes encoding images (output is identical for any count).")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted pack into the same --out.")] = False,
    name: Annotated[str | None, typer.Option("--name", help="dataset_name in the manifest (default: the input's name).")] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root", help="Where relative image paths of a CSV/JSONL/JSON resolve (default: its folder); absolute paths are used as they are.")] = None,
    image_column: Annotated[str | None, typer.Option("--image-column", help="The image: a parquet/dataset column, a tar member extension (jpg) or a CSV/JSON key (default: detected).")] = None,
    caption_column: Annotated[str | None, typer.Option("--caption-column", help="The caption: a parquet/dataset column, a tar member extension (txt) or JSON field, or a CSV/JSON key (default: detected).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of a Hugging Face dataset (hf:REPO_ID or a save_to_disk folder).")] = "train",
    quiet: QuietOpt = False,
) -> None:
    """Pack images with captions or conversations into WebDataset tar shards + wds_manifest.json."""
    from scale_rae_core.data.pack import EVENTS_NAME
    from scale_rae_core.data.pack import pack as run_pack
    from scale_rae_core.events import Reporter

    with Reporter(out / EVENTS_NAME, show_progress=not quiet) as rep:
        with rep.task("packing", None) as advance:
            last = 0

            def progress(done: int, total: int) -> None:
                nonlocal last
                advance(done - last, total=total)
                last = done

            s = run_pack(
                input, out, format=format, task=task, samples_per_shard=samples_per_shard,
                max_shard_bytes=shard_bytes, image_size=image_size, codec=codec, quality=quality,
                workers=workers, resume=resume, dataset_name=name, image_root=image_root,
                image_column=image_column, caption_column=caption_column, split=split, progress=progress,
                reporter=rep,
            )
    rate = s.packed / s.seconds if s.seconds else 0.0
    typer.echo(
        f"packed {s.packed} samples into {s.shards} shards ({s.bytes / 1e6:.1f} MB, {rate:.0f} samples/s), "
        f"skipped {s.skipped}" + (f" (see {out / 'rejects.jsonl'})" if s.skipped else "")
        + (f", kept {s.resumed_shards} finished shards" if s.resumed_shards else "")
    )
    typer.echo(f"manifest: {s.manifest}")


def inspect(
    path: PackedArg,
    samples: Annotated[int, int_option("--samples", help="How many samples to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show shard counts, totals and a few decoded samples."""
    import json

    from scale_rae_core.data.shards import inspect as run_inspect

    info = run_inspect(path, samples=samples)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()  # the data's own text is escaped: "[stage2]" in a caption is shown, not read as markup
    console.print(f"[bold]{escape(info['dataset_name'])}[/] — {info['total']} samples in {len(info['shards'])} shards "
                  f"({escape(str(info['manifest']))})")
    if info.get("skipped"):
        console.print(escape(f"skipped while packing: {info['skipped']}"))
    table = Table("key", "shard", "image", "conversation", "metadata")
    for s in info["samples"]:
        conv = " | ".join(f"{t['from']}: {t['value']}" for t in s["conversations"])
        size = "×".join(map(str, s["image_size"])) if s["image_size"] else "-"
        table.add_row(*(escape(str(cell)) for cell in (s["key"], s["shard"], size, conv[:80], json.dumps(s["metadata"])[:60])))
    console.print(table)


def verify(path: PackedArg) -> None:
    """Re-read every sample and check it against the manifest; exit 1 if anything is wrong."""
    from scale_rae_core.data.shards import verify as run_verify

    report = run_verify(path)
    for p in report.problems:
        typer.echo(f"problem: {p.file}: {p.reason}")
    typer.echo(f"{'ok' if report.ok else 'FAILED'}: {report.samples} samples in {report.shards} shards checked, {len(report.problems)} problems")
    if not report.ok:
        raise typer.Exit(1)
