"""`srae data synth|pack|inspect|verify`."""

from __future__ import annotations

from pathlib import Path

import typer

from scale_rae_cli.options import QuietOpt

app = typer.Typer(help="Make, pack, inspect and verify training data.", no_args_is_help=True)


@app.command("synth", epilog="Example: srae data synth shapes --n 2000 --image-size 64")
def synth(
    out: Path = typer.Argument(..., help="Empty output folder."),
    n: int = typer.Option(2000, "--n", help="Images in total; a --heldout fraction of them go to heldout/."),
    image_size: int = typer.Option(64, "--image-size", help="Image side in pixels (16–256 and up)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    heldout: float = typer.Option(0.1, "--heldout", help="Fraction of images kept apart in heldout/ for evaluation."),
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


@app.command(
    "pack",
    epilog="Examples: srae data pack shapes/conversations.jsonl --out packed · "
    "srae data pack photos/ --task generation --image-size 256 --codec jpg --workers 2 --out packed",
)
def pack(
    input: Path = typer.Argument(..., help="Folder of images + .txt captions, a CSV/JSONL of (image, caption), a conversations JSONL, or a class-folder tree."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for shards, wds_manifest.json and rejects.jsonl."),
    format: str | None = typer.Option(None, "--format", help="captions | conversations | classes (default: detected)."),
    task: str = typer.Option("both", "--task", help="For captions: generation | understanding | both."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", help="Samples per tar shard."),
    shard_bytes: int = typer.Option(1 << 30, "--shard-bytes", help="Start a new shard before a tar passes this size."),
    image_size: int | None = typer.Option(None, "--image-size", help="Shrink so the longer side is at most this (default: keep)."),
    codec: str = typer.Option("png", "--codec", help="png | jpg | webp."),
    quality: int = typer.Option(95, "--quality", help="jpg/webp quality."),
    workers: int = typer.Option(1, "--workers", help="Processes encoding images (output is identical for any count)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted pack into the same --out."),
    name: str | None = typer.Option(None, "--name", help="dataset_name in the manifest (default: the input's name)."),
    image_root: Path | None = typer.Option(None, "--image-root", help="Where relative image paths of a CSV/JSONL resolve (default: its folder)."),
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
                workers=workers, resume=resume, dataset_name=name, image_root=image_root, progress=progress,
                reporter=rep,
            )
    rate = s.packed / s.seconds if s.seconds else 0.0
    typer.echo(
        f"packed {s.packed} samples into {s.shards} shards ({s.bytes / 1e6:.1f} MB, {rate:.0f} samples/s), "
        f"skipped {s.skipped}" + (f" (see {out / 'rejects.jsonl'})" if s.skipped else "")
        + (f", kept {s.resumed_shards} finished shards" if s.resumed_shards else "")
    )
    typer.echo(f"manifest: {s.manifest}")


@app.command("inspect", epilog="Example: srae data inspect packed --samples 5")
def inspect(
    path: Path = typer.Argument(..., help="Packed folder or its wds_manifest.json."),
    samples: int = typer.Option(3, "--samples", help="How many samples to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show shard counts, totals and a few decoded samples."""
    import json

    from scale_rae_core.data.shards import inspect as run_inspect

    info = run_inspect(path, samples=samples)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{info['dataset_name']}[/] — {info['total']} samples in {len(info['shards'])} shards ({info['manifest']})")
    if info.get("skipped"):
        console.print(f"skipped while packing: {info['skipped']}")
    table = Table("key", "shard", "image", "conversation", "metadata")
    for s in info["samples"]:
        conv = " | ".join(f"{t['from']}: {t['value']}" for t in s["conversations"])
        size = "×".join(map(str, s["image_size"])) if s["image_size"] else "-"
        table.add_row(s["key"], s["shard"], size, conv[:80], json.dumps(s["metadata"])[:60])
    console.print(table)


@app.command("verify", epilog="Example: srae data verify packed")
def verify(path: Path = typer.Argument(..., help="Packed folder or its wds_manifest.json.")) -> None:
    """Re-read every sample and check it against the manifest; exit 1 if anything is wrong."""
    from scale_rae_core.data.shards import verify as run_verify

    report = run_verify(path)
    for p in report.problems:
        typer.echo(f"problem: {p.file}: {p.reason}")
    typer.echo(f"{'ok' if report.ok else 'FAILED'}: {report.samples} samples in {report.shards} shards checked, {len(report.problems)} problems")
    if not report.ok:
        raise typer.Exit(1)
