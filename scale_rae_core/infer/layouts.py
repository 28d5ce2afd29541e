"""Benchmark layouts of generated images (GenEval, DPG-Bench), their prompt files, and contact sheets.

**GenEval** (djghosh13/geneval, ``evaluation/evaluate_images.py``) finds its images like this:

* every entry of the image folder that is a folder named by digits only is one prompt; anything else is ignored;
* it ``json.load``\\ s ``<folder>/metadata.jsonl`` (ONE object: that prompt's line of ``evaluation_metadata.jsonl``) —
  a prompt folder without it stops the whole evaluation;
* every file of ``<folder>/samples/`` whose name matches ``\\d+\\.png`` is one image, scored against that
  metadata: ``tag`` (the task; ``counting`` uses another detector threshold) and ``include``
  (``[{"class", "count", "color"?, "position"?}]``; ``exclude`` optional). A prompt without ``tag`` stops the
  evaluation with ``KeyError: 'tag'``;
* the score is the mean over the images of each tag, then over tags: a prompt without images counts nowhere.

So ``--layout geneval`` writes, for prompt line i (its ``index``, else its position in the file),
``OUT/{i:05d}/metadata.jsonl`` (the line, plus ``seeds``: one per sample, and srae's settings under ``srae``) and
``OUT/{i:05d}/samples/{k:05d}.png``, and refuses prompts without GenEval's fields (:func:`check_layout`). A prompt
that failed keeps its folder, with ``"srae_failed": reason`` in its metadata and an empty ``samples/``, and is
counted in ``OUT/report.json``: GenEval cannot score it, the report says so instead of the prompt vanishing.

**DPG-Bench** (TencentQQGYLab/ELLA, ``dpg_bench/compute_dpg_bench.py``) reads every file of its
``--image-root-path`` as one prompt: the item id is the file name before its first ``.``, the image a 2×2 grid of
``--pic-num 4`` tiles of ``--resolution`` pixels, cut row by row (top-left, top-right, bottom-left, bottom-right).
So ``--layout dpg`` writes ``OUT/{item_id}.png``, the grid of a prompt's 4 samples (sample k at row k // 2, column
k % 2); ids come from a JSONL line's ``item_id`` (or ``id``) or from the file names of DPG's prompts folder
(``{item_id}.txt``). Its reader skips ``OUT/report.json`` with one "Failed filename" line. A failed prompt has no
grid and is listed in the report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.files import atomic_write, finite_json, read_text
from scale_rae_core.prompts import IMAGE_MARKER

LAYOUTS = ("geneval", "dpg")
GENEVAL_FIELDS = ("tag", "include")
DPG_ID_KEYS = ("item_id", "id")
DPG_TILES = 4  # 2 × 2, DPG-Bench's --pic-num 4
FAILED = "srae_failed"  # the reason a prompt folder holds no samples
REPORT_FILE = "report.json"
GRID_FILE = "grid.png"  # GenEval's own generator writes one per prompt folder (optional there)
_BAD_ID = re.compile(r"[./\\\x00]|^$")  # DPG reads the id before the first '.'; ids are file names


# ----------------------------------------------------------------------------------------------- prompt lines
def read_prompt_lines(path: Path, flag: str) -> list[dict[str, Any]]:
    """Prompt lines ``{"index", "prompt", ...}`` from a reference JSONL ({"index"?, "prompt"}), a GenEval
    metadata JSONL ({"prompt", "tag", "include", ...}), DPG-Bench's prompts folder ({item_id}.txt, in natural
    order of the ids) or plain text (one prompt per line). Without an "index" a line's index is its position."""
    path = Path(path)
    if path.is_dir():
        return _read_prompt_folder(path, flag)
    if not path.is_file():
        raise DataError(f"{flag} {path}: not found; pass a JSONL with \"prompt\", a text file (one per line) "
                        "or DPG-Bench's prompts folder")
    lines = [(n, s) for n, s in enumerate(read_text(path, flag).splitlines(), 1) if s.strip()]
    if not lines:
        raise DataError(f"{flag} {path}: empty")
    is_jsonl = lines[0][1].lstrip().startswith("{")
    out: list[dict[str, Any]] = []
    for position, (number, text) in enumerate(lines):
        if not is_jsonl:
            out.append({"index": position, "prompt": text.strip()})
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{flag} {path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise DataError(f"{flag} {path}:{number}: needs a non-empty \"prompt\" string")
        index = item.get("index", position)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise DataError(f"{flag} {path}:{number}: \"index\" must be a non-negative integer")
        out.append({**item, "index": index})
    return _checked(out, f"{flag} {path}")


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_prompt_folder(folder: Path, flag: str) -> list[dict[str, Any]]:
    files = sorted((p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file()), key=lambda p: _natural(p.stem))
    if not files:
        raise DataError(f"{flag} {folder}: a folder without .txt prompts; pass DPG-Bench's prompts folder "
                        "({item_id}.txt) or a prompt file")
    out = []
    for position, p in enumerate(files):
        text = " ".join(read_text(p, flag).split())
        if not text:
            raise DataError(f"{flag} {p}: empty prompt")
        out.append({"index": position, "item_id": p.stem, "prompt": text})
    return _checked(out, f"{flag} {folder}")


def _checked(lines: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    seen: set[int] = set()
    for line in lines:
        if line["index"] in seen:
            raise DataError(f"{where}: index {line['index']} appears twice")
        seen.add(line["index"])
        if IMAGE_MARKER in line["prompt"]:
            raise DataError(f"{where}: prompt {line['prompt'][:40]!r} contains <image>; to ask about an image use "
                            "`srae understand`")
    return lines


def read_layout_prompts(prompts: Sequence[str], prompts_file: Path | None, layout: str | None) -> list[dict[str, Any]]:
    """``srae generate``'s prompts as lines. Without a layout: the PROMPT arguments and ``--prompts-file`` as
    :func:`~scale_rae_core.infer.generate.read_prompts` reads them. With one: the file's lines with every field
    (any :func:`read_prompt_lines` form) after the arguments; with arguments, every line is numbered by position."""
    from scale_rae_core.infer.generate import read_prompts

    if layout is None:
        return [{"index": i, "prompt": p} for i, p in enumerate(read_prompts(list(prompts), prompts_file))]
    args = [{"prompt": p} for p in prompts if p.strip()]
    from_file = read_prompt_lines(prompts_file, "--prompts-file") if prompts_file is not None else []
    if not args and not from_file:
        raise DataError("no prompt given; pass PROMPT arguments or --prompts-file FILE")
    if not args:
        return from_file
    lines = [{**{k: v for k, v in line.items() if k != "index"}, "index": i} for i, line in enumerate(args + from_file)]
    return _checked(lines, "PROMPT")


# ----------------------------------------------------------------------------------------------- checks
def _geneval_problem(line: dict[str, Any]) -> str | None:
    missing = [f"'{f}'" for f in GENEVAL_FIELDS if f not in line]
    if missing:
        return f"lacks GenEval's {' and '.join(missing)}"
    if not isinstance(line["tag"], str):
        return "'tag' must be a string (GenEval's task name)"
    include = line["include"]
    if not isinstance(include, list) or not all(
            isinstance(r, dict) and isinstance(r.get("class"), str) and isinstance(r.get("count"), int)
            for r in include):
        return "'include' must be a list of {\"class\": name, \"count\": n, ...} objects"
    return None


def dpg_id(line: dict[str, Any]) -> str | None:
    """A line's DPG-Bench item id ("item_id", else "id"), as a string; None when it has neither."""
    for key in DPG_ID_KEYS:
        if key in line and line[key] is not None:
            return str(line[key])
    return None


def check_layout_name(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")


def check_layout(lines: Sequence[tuple[str, dict[str, Any]]], layout: str | None) -> None:
    """Refuse, in one line, prompts a layout cannot hold: ``lines`` are (where the line comes from, the line).

    GenEval needs ``tag`` and ``include`` in every prompt (its evaluation reads both); DPG-Bench an item id per
    prompt that can be a file name (no '.', no '/') and appears once."""
    if layout is None:
        return
    check_layout_name(layout)
    seen: dict[str, str] = {}
    for where, line in lines:
        if layout == "geneval":
            problem = _geneval_problem(line)
            if problem:
                raise DataError(
                    f"{where}: {problem}; GenEval's evaluate_images.py reads 'tag' and 'include' of every prompt "
                    "(KeyError 'tag' otherwise): use GenEval's prompts/evaluation_metadata.jsonl, or drop --layout geneval"
                )
            continue
        item = dpg_id(line)
        if item is None or _BAD_ID.search(item):
            what = "has no item id" if item is None else f"item id {item!r} cannot name a file (no '.', '/' or '\\\\')"
            raise DataError(
                f"{where}: {what}; DPG-Bench names each grid by its item id: pass DPG-Bench's prompts folder "
                "({item_id}.txt) or a JSONL with \"item_id\", or drop --layout dpg"
            )
        if item in seen:
            raise DataError(f"{where}: item id {item!r} appears twice (also at {seen[item]}); DPG-Bench needs one grid per id")
        seen[item] = where


def check_dpg_count(n: int, flag: str) -> None:
    if n != DPG_TILES:
        raise ConfigError(f"{flag} {n}: --layout dpg makes a 2x2 grid of {DPG_TILES} samples per prompt; pass {flag} {DPG_TILES}")


# ----------------------------------------------------------------------------------------------- writing
def empty_output(out: Path, flag: str = "--out") -> Path:
    """A benchmark tree goes into a new or empty folder (never mixed with another run's images)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{flag} {out}: {'a file' if not out.is_dir() else 'not empty'}; a --layout writes a whole "
                        "benchmark tree into a new or empty folder: pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_metadata(folder: Path, meta: dict[str, Any]) -> Path:
    """``folder/metadata.jsonl``: one JSON object on one line (GenEval ``json.load``\\ s it), written atomically."""
    path = folder / "metadata.jsonl"
    text = finite_json(meta, str(path), ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_failed(folder: Path, meta: dict[str, Any], reason: str) -> None:
    """A prompt that produced no samples: its folder, metadata with the reason, an empty ``samples/``."""
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    write_metadata(folder, {**meta, FAILED: reason})


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] (clamped) -> an RGB image, rounded as ``write_png`` rounds."""
    arr = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def contact_sheet(images: Sequence[Image.Image], cols: int, pad: int = 0) -> Image.Image:
    """Images row by row, ``cols`` per row, in cells of the largest width and height, ``pad`` pixels apart."""
    assert images and cols >= 1
    w, h = max(im.width for im in images), max(im.height for im in images)
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), (255, 255, 255))
    for k, im in enumerate(images):
        sheet.paste(im.convert("RGB"), ((k % cols) * (w + pad), (k // cols) * (h + pad)))
    return sheet


def dpg_grid(images: Sequence[Image.Image]) -> Image.Image:
    """The 2×2 grid DPG-Bench cuts into tiles: sample k at row k // 2, column k % 2, no gaps."""
    if len(images) != DPG_TILES or len({im.size for im in images}) != 1:
        raise DataError(f"a DPG-Bench grid needs {DPG_TILES} samples of one size, got {[im.size for im in images]}")
    return contact_sheet(images, 2)


def read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def save_image(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_report(out: Path, report: dict[str, Any]) -> Path:
    path = out / REPORT_FILE
    text = finite_json(report, str(path), indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- srae generate
def prepare_output(lines: list[dict[str, Any]], out: Path, layout: str | None, *, n: int, grid: bool,
                   save_latents: bool, decode: bool) -> None:
    """Every check of ``srae generate --layout / --grid`` that needs no model: run it before loading one."""
    if layout is None:
        if grid and not decode:
            raise ConfigError("--grid needs images; drop --skip-decoder")
        return
    check_layout_name(layout)
    if save_latents or not decode:
        raise ConfigError(f"--layout {layout} writes images only; drop --save-latent and --skip-decoder")
    if layout == "dpg":
        check_dpg_count(n, "--n")
        if grid:
            raise ConfigError("--grid: --layout dpg writes one grid per prompt already; drop --grid")
    check_layout([(f"prompt {line['index']} ({line['prompt'][:30]!r})", line) for line in lines], layout)
    empty_output(out)


def _name(line: dict[str, Any], layout: str) -> str:
    return str(dpg_id(line)) if layout == "dpg" else f"{line['index']:05d}"


class LayoutWriter:
    """``generate_images``' writer for a layout: samples (GenEval) or tiles (DPG) as they come, then, with a
    prompt's last image, its metadata and grid (GenEval) or its 2×2 grid (DPG)."""

    def __init__(self, out: Path, lines: list[dict[str, Any]], layout: str, n: int, grid: bool,
                 srae: dict[str, Any]) -> None:
        self.out, self.lines, self.layout, self.n, self.grid, self.srae = out, lines, layout, n, grid, srae
        self.tiles: list[Image.Image] = []
        self.seeds: list[int] = []
        self.items: dict[str, dict[str, Any]] = {}  # DPG: what each grid holds (goes into the report)
        self.side: int | None = None  # DPG: the tile side, compute_dpg_bench.py's --resolution

    def __call__(self, position: int, text: Any, seed: int, j: int, pixels: torch.Tensor) -> Any:
        from scale_rae_core.infer.generate import ImageRecord

        line = self.lines[position]
        image = to_image(pixels)
        self.side = image.width
        self.tiles.append(image)
        self.seeds.append(seed)
        if self.layout == "geneval":
            folder = self.out / _name(line, self.layout)
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            png = save_image(image, folder / "samples" / f"{j:05d}.png")
            manifest = folder / "metadata.jsonl"
        else:
            png, manifest = self.out / f"{dpg_id(line)}.png", self.out / REPORT_FILE  # the grid, with the last tile
        if j == self.n - 1:
            self._finish(line, text)
        return ImageRecord(line["prompt"], seed, png.with_suffix(""), png, manifest, None, text.text)

    def _finish(self, line: dict[str, Any], text: Any) -> None:
        made = {"seeds": self.seeds, "output_text": text.text, "image_start": "forced" if text.forced else "model"}
        if self.layout == "geneval":
            folder = self.out / _name(line, self.layout)
            write_metadata(folder, {**line, "seeds": self.seeds, "srae": {**self.srae, **made}})
            if self.grid:
                save_image(contact_sheet(self.tiles, self.n, pad=2), folder / GRID_FILE)
        else:
            save_image(dpg_grid(self.tiles), self.out / f"{dpg_id(line)}.png")
            self.items[str(dpg_id(line))] = {"index": line["index"], "prompt": line["prompt"], **made}
        self.tiles, self.seeds = [], []


def generate_layout(session: Any, lines: list[dict[str, Any]], out: Path, settings: Any, *, layout: str | None,
                    grid: bool = False, seed: int = 0, n: int = 1, batch_size: int = 4, max_new_tokens: int = 64,
                    save_latents: bool = False, decode: bool = True, reporter: Any = None,
                    noise: Any = None) -> dict[str, Any]:
    """``srae generate``: the images of ``lines`` into ``out`` in ``layout`` (None: srae's flat files), plus a
    contact sheet with ``grid``; call :func:`prepare_output` first. ``noise``: the start noise (``infer.noise``). Returns a summary: ``images`` (ImageRecords),
    ``failed`` {prompt folder / item id: reason}, ``report`` and ``grid`` (paths or None), ``timings``."""
    from scale_rae_core.infer.generate import GenerateResult, generate_images, request_ids
    from scale_rae_core.models.llm import SequenceTooLongError

    common = dict(seed=seed, n=n, batch_size=batch_size, max_new_tokens=max_new_tokens, reporter=reporter, noise=noise)
    if layout is None:
        result = generate_images(session, [line["prompt"] for line in lines], out, settings, save_latents=save_latents,
                                 decode=decode, **common)
        sheet = _flat_sheet(out, result.images, n) if grid else None
        return {"images": result.images, "failed": {}, "report": None, "grid": sheet, "timings": result.timings}
    ok, failed = [], {}
    for line in lines:  # a prompt that cannot be asked fails alone; the others go on
        try:
            request_ids(session, line["prompt"])
            ok.append(line)
        except SequenceTooLongError as exc:
            failed[_name(line, layout)] = str(exc)
            if layout == "geneval":
                write_failed(out / _name(line, layout), line, str(exc))
    session.decoder()  # loaded now, so the manifest names it (generate_images would load it anyway)
    srae = {**session.base_manifest("generate"), **settings.describe(), "max_new_tokens": max_new_tokens}
    writer = LayoutWriter(out, ok, layout, n, grid, srae)
    result = (generate_images(session, [line["prompt"] for line in ok], out, settings, writer=writer, **common)
              if ok else GenerateResult())
    report: dict[str, Any] = {"layout": layout, "prompts": len(lines), "samples_per_prompt": n, "seed": seed,
                              "images": len(result.images), "failed": failed, "srae": srae}
    if layout == "dpg":
        report |= {"evaluate_with": {"--resolution": writer.side, "--pic-num": DPG_TILES}, "items": writer.items}
    return {"images": result.images, "failed": failed, "report": write_report(out, report), "grid": None,
            "timings": result.timings}


def _flat_sheet(out: Path, images: list[Any], n: int) -> Path | None:
    """One contact sheet of a flat run's images: a row per prompt (n > 1), else rows of up to 8."""
    if not images:
        return None
    first = images[0].stem.name.split("-")[0]
    cols = n if n > 1 else min(len(images), 8)
    return save_image(contact_sheet([read_rgb(rec.png) for rec in images], cols, pad=2), out / f"grid-{first}.png")
