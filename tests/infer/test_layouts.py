"""`srae generate --layout geneval | dpg` and `--grid` on a tiny random Scale-RAE: the trees are checked with the
benchmarks' own discovery rules (GenEval's evaluate_images.py, DPG-Bench's compute_dpg_bench.py) written as tests."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from scale_rae_cli.main import app
from tests.infer.helpers import build_tiny, write_decoder, write_export

LONG = "a " + "very " * 2100 + "long prompt"  # more than the tiny LLM's 2048 positions: its request cannot be asked
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
     "prompt": LONG},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    net, tok = build_tiny(tmp)
    return ["--model", str(write_export(net, tok, tmp / "export")), "--decoder", str(write_decoder(tmp / "decoder")),
            "--steps", "2", "--max-new-tokens", "1", "--profile", "tiny-cpu", "-q"]


def generate(args: list[str]):
    return CliRunner().invoke(app, ["generate", *args])


def geneval_discover(imagedir: Path) -> list[tuple[str, dict]]:
    """GenEval's evaluation, less the detector: the folders and images it finds and the metadata fields it reads
    for each image (evaluate_images.py main() and evaluate_image())."""
    found = []
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            assert isinstance(metadata["tag"], str) and isinstance(metadata["prompt"], str)
            for req in metadata.get("include", []):
                assert isinstance(req["class"], str) and isinstance(req["count"], int)
            found.append((imagepath, metadata))
    return found


def test_geneval_tree_is_what_genevals_evaluation_discovers(model, tmp_path):
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    out = tmp_path / "geneval"
    res = generate(["--prompts-file", str(prompts), "--layout", "geneval", "--n", "2", "--seed", "7", "--grid",
                    "--out", str(out), *model])
    assert res.exit_code == 0, res.output
    assert "--layout geneval: 3 prompts, 1 failed" in res.output and "failed 00001: prompt 'a very" in res.output

    found = geneval_discover(out)
    assert sorted(Path(p).relative_to(out).as_posix() for p, _ in found) == [
        "00000/samples/00000.png", "00000/samples/00001.png", "00002/samples/00000.png", "00002/samples/00001.png"]
    for path, meta in found:
        line = GENEVAL_LINES[int(Path(path).parts[-3])]
        assert {k: meta[k] for k in line} == line  # the prompt's line of evaluation_metadata.jsonl, as given
        assert meta["seeds"] == [7, 8] and meta["srae"]["steps"] == 2 and meta["srae"]["max_new_tokens"] == 1
    # the failed prompt keeps its folder: GenEval reads its metadata, finds no image; the report counts it
    failed = json.loads((out / "00001" / "metadata.jsonl").read_text())
    assert failed["tag"] == "counting" and "longer than the 2048 tokens" in failed["srae_failed"]
    assert list((out / "00001" / "samples").iterdir()) == []
    report = json.loads((out / "report.json").read_text())
    assert (report["layout"], report["prompts"], report["images"]) == ("geneval", 3, 4)
    assert list(report["failed"]) == ["00001"]
    # --grid: GenEval's optional grid.png per prompt folder, the samples side by side
    grid = Image.open(out / "00000" / "grid.png")
    tiles = [Image.open(out / "00000" / "samples" / f"{k:05d}.png") for k in (0, 1)]
    assert grid.size == (2 * 64 + 2, 64)
    assert grid.crop((66, 0, 130, 64)).tobytes() == tiles[1].convert("RGB").tobytes()
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002", "report.json"]  # no events.jsonl


def test_geneval_layout_refuses_prompts_without_genevals_fields(model, tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("a photo of a bench\n")
    res = generate(["--prompts-file", str(plain), "--layout", "geneval", "--out", str(tmp_path / "o"), *model])
    assert res.exit_code == 1 and "\n" not in res.output.strip()
    assert res.output.startswith("error: prompt 0 ('a photo of a bench'): lacks GenEval's 'tag' and 'include';")
    assert "evaluation_metadata.jsonl" in res.output and not (tmp_path / "o").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "tag": "single_object", "include": [{"class": "cat"}]}) + "\n")
    res = generate(["--prompts-file", str(bad), "--layout", "geneval", "--out", str(tmp_path / "o"), *model])
    assert res.exit_code == 1 and "'include' must be a list of" in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"")
    prompts = tmp_path / "g.jsonl"
    prompts.write_text(json.dumps(GENEVAL_LINES[0]) + "\n")
    res = generate(["--prompts-file", str(prompts), "--layout", "geneval", "--out", str(tmp_path / "full"), *model])
    assert res.exit_code == 1 and "not empty; a --layout writes a whole benchmark tree" in res.output
    res = generate(["--prompts-file", str(prompts), "--layout", "parti", "--out", str(tmp_path / "x"), *model])
    assert res.exit_code == 1 and "--layout 'parti' is unknown; choose one of geneval, dpg" in res.output


def dpg_items(image_root: Path, ids: set[str], resolution: int, pic_num: int = 4) -> dict[str, list[Image.Image]]:
    """DPG-Bench's reader, less the VQA model: every file of the folder is one item, named by what precedes its first
    '.', cut into pic_num tiles of resolution px row by row (compute_dpg_bench.py compute_dpg_one_sample)."""
    items = {}
    for fn in os.listdir(image_root):
        key = os.path.basename(fn).split(".")[0]
        if key not in ids:
            continue  # DPG's question lookup fails for it and the file is skipped ("Failed filename")
        image = Image.open(os.path.join(image_root, fn))
        r = resolution
        crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)][:pic_num]
        items[key] = [image.crop(c) for c in crops]
    return items


def test_dpg_layout_is_one_2x2_grid_per_prompt_id_in_sample_order(model, tmp_path):
    folder = tmp_path / "prompts"  # DPG-Bench's prompts folder: {item_id}.txt
    folder.mkdir()
    (folder / "partiprompts10.txt").write_text("a red circle on a blue square\n")
    (folder / "partiprompts2.txt").write_text("a green triangle\n")
    (folder / "whoops7.txt").write_text(LONG)
    out = tmp_path / "dpg"
    res = generate(["--prompts-file", str(folder), "--layout", "dpg", "--n", "4", "--seed", "3", "--out", str(out),
                    *model])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["partiprompts10.png", "partiprompts2.png", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert list(report["failed"]) == ["whoops7"] and report["evaluate_with"] == {"--resolution": 64, "--pic-num": 4}
    assert report["items"]["partiprompts2"]["seeds"] == [3, 4, 5, 6] and report["items"]["partiprompts2"]["index"] == 0
    items = dpg_items(out, {"partiprompts10", "partiprompts2", "whoops7"}, resolution=64)
    assert sorted(items) == ["partiprompts10", "partiprompts2"]
    assert Image.open(out / "partiprompts2.png").size == (128, 128)
    # tile k is the sample of seed 3 + k: the same image `srae generate --seed 3+k` writes for that prompt
    flat = tmp_path / "flat"
    for k in (0, 3):
        res = generate(["a green triangle", "--seed", str(3 + k), "--out", str(flat), *model])
        assert res.exit_code == 0, res.output
    pngs = sorted(flat.glob("*.png"))
    for k, png in zip((0, 3), pngs, strict=True):
        tile = items["partiprompts2"][k].convert("RGB")
        single = Image.open(png).convert("RGB")
        assert max(abs(a - b) for a, b in zip(tile.tobytes(), single.tobytes(), strict=True)) <= 1  # batch rounding


def test_dpg_layout_refusals(model, tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("a red circle\n")
    res = generate(["--prompts-file", str(plain), "--layout", "dpg", "--n", "4", "--out", str(tmp_path / "o"), *model])
    assert res.exit_code == 1 and "prompt 0 ('a red circle'): has no item id; DPG-Bench names each grid" in res.output
    lines = tmp_path / "l.jsonl"
    lines.write_text(json.dumps({"item_id": "a.b", "prompt": "x"}) + "\n")
    res = generate(["--prompts-file", str(lines), "--layout", "dpg", "--n", "4", "--out", str(tmp_path / "o"), *model])
    assert res.exit_code == 1 and "item id 'a.b' cannot name a file" in res.output
    lines.write_text(json.dumps({"item_id": "7", "prompt": "x"}) + "\n" + json.dumps({"id": 7, "prompt": "y"}) + "\n")
    res = generate(["--prompts-file", str(lines), "--layout", "dpg", "--n", "4", "--out", str(tmp_path / "o"), *model])
    assert res.exit_code == 1 and "item id '7' appears twice" in res.output
    lines.write_text(json.dumps({"item_id": "7", "prompt": "x"}) + "\n")
    for extra, message in ((["--n", "2"], "--n 2: --layout dpg makes a 2x2 grid of 4 samples per prompt; pass --n 4"),
                           (["--n", "4", "--grid"], "--layout dpg writes one grid per prompt already; drop --grid"),
                           (["--n", "4", "--save-latent"], "--layout dpg writes images only")):
        res = generate(["--prompts-file", str(lines), "--layout", "dpg", *extra, "--out", str(tmp_path / "o"), *model])
        assert res.exit_code == 1 and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_grid_is_a_contact_sheet_of_all_images(model, tmp_path):
    out = tmp_path / "flat"
    res = generate(["a red circle", "a blue square", "--n", "2", "--grid", "--out", str(out), *model])
    assert res.exit_code == 0, res.output
    sheet = Image.open(out / "grid-00000.png").convert("RGB")
    assert sheet.size == (2 * 64 + 2, 2 * 64 + 2)  # a row per prompt, a column per image
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 4 and f"grid {out / 'grid-00000.png'}" in res.output
    assert sheet.crop((66, 66, 130, 130)).tobytes() == Image.open(pngs[3]).convert("RGB").tobytes()
    res = generate(["a red circle", "--grid", "--skip-decoder", "--save-latent", "--out", str(out), *model])
    assert res.exit_code == 1 and "--grid needs images; drop --skip-decoder" in res.output
