"""Selection metrics, the GenEval tree and the report, on a synthetic scaling run of tiny PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.errors import DataError
from scale_rae_core.scale.select import read_prompt_folder, read_run, select, write_selection

# prompt 0: six samples with every score
P0 = {
    "score": [1, 0, 1, 1, 0, 1],
    "yes_conf_score": [0.5, 0, 0.9, 0.9, 0, 0.1],
    "no_conf_score": [0, 0.7, 0.2, 0.1, 0.3, 0],
    "yes_logit": [3, 0, 5, 4, 0, 2],
    "no_logit": [0, 6, 1, 1, 2, 0],
    "prompt_loss": [2.0, 0.5, 1.0, 3.0, 0.7, 1.5],
    "prompt_conf_score": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    "image_conf_score": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
    "response_conf_score": [0.3, 0.3, 0.3, 0.3, 0.3, 0.9],
}
IR0 = [0.1, 0.9, -0.3, 0.5, 0.2, 0.0]
SHAPES0 = [1, 0, 0, 1, 1, 0]


def make_prompt(root: Path, index: int, fields: dict[str, list], ir: list[float], shapes: list[float] | None,
                line: dict | None = None) -> Path:
    folder = root / f"{index:05d}"
    (folder / "samples").mkdir(parents=True)
    n = len(ir)
    for k in range(n):
        Image.new("RGB", (8, 8), (40 * k, 10 * index, 0)).save(folder / "samples" / f"{k:05d}.png")
    responses = {str(k): {name: values[k] for name, values in fields.items()} for k in range(n)}
    for k in responses:
        responses[k]["answer"] = "yes" if responses[k].get("score") else "no"
    meta = {**(line or {"prompt": f"a red circle {index}", "tag": "single_object", "include": [{"class": "x", "count": 1}]}),
            "n_samples_generated": n, "text_responses": responses, "all_ir_scores": ir,
            "top_ir_scores": sorted(ir, reverse=True), "top_ir_indices": sorted(range(n), key=lambda k: -ir[k])}
    if shapes is not None:
        meta["scores"] = {"shapes": shapes, "image_reward": ir}
    (folder / "metadata.jsonl").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "2_verify_scale_latent"
    make_prompt(root, 0, P0, IR0, SHAPES0)
    small = {name: values[:2] for name, values in P0.items()}
    make_prompt(root, 1, small, [0.3, 0.4], [0, 1])  # fewer samples than --keep
    return root


@pytest.mark.parametrize("metric,order", [
    ("answer_conf", [3, 2, 0, 5, 4, 1]),
    ("answer_logits", [2, 3, 0, 5, 4, 1]),
    ("loss", [1, 4, 2, 5, 0, 3]),  # the real prompt_loss, lowest first (reference keyed on yes_conf)
    ("prompt_conf", [5, 4, 3, 2, 1, 0]),
    ("image_conf", [0, 1, 2, 3, 4, 5]),
    ("response_conf", [5, 2, 3, 0, 4, 1]),  # ties on conf: -yes_logit, then +no_logit
    ("image_reward", [1, 3, 4, 0, 5, 2]),
    ("combined", [3, 0, 1, 2, 4, 5]),  # mean of IR rank and answer_conf rank; tie 0/1 by index
    ("shapes", [0, 3, 4, 1, 2, 5]),
])
def test_metric_orders(run_dir, metric, order):
    run = read_prompt_folder(run_dir / "00000")
    assert select(run, metric, 6) == order
    assert select(run, metric, 2) == order[:2]


def test_verify_writes_a_geneval_tree_and_report(run_dir, tmp_path):
    out = tmp_path / "selected"
    result = CliRunner().invoke(app, ["verify", str(run_dir), "--metric", "combined", "--keep", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "combined *" in result.output and "fewer than 4 samples" in result.output

    pngs = sorted(p.name for p in (out / "00000" / "samples").iterdir())
    assert pngs == ["00000.png", "00001.png", "00002.png", "00003.png"]
    for j, k in enumerate([3, 0, 1, 2]):  # renumbered, best first
        assert (out / "00000" / "samples" / f"{j:05d}.png").read_bytes() == (run_dir / "00000" / "samples" / f"{k:05d}.png").read_bytes()
    meta = json.loads((out / "00000" / "metadata.jsonl").read_text())
    assert meta["prompt"] == "a red circle 0" and meta["tag"] == "single_object" and meta["include"]
    assert meta["selection"]["source_indices"] == [3, 0, 1, 2]
    assert meta["text_responses"]["0"]["prompt_loss"] == 3.0  # sample 3's scores, now sample 0
    assert meta["scores"]["shapes"] == [1, 1, 0, 0]
    assert "all_ir_scores" not in meta and "top_ir_indices" not in meta
    assert len(list((out / "00001" / "samples").iterdir())) == 2  # kept all

    report = json.loads((out / "report.json").read_text())
    assert report["short"] == {"00001": 2} and report["prompts"] == 2
    assert set(report["metrics"]) >= {"combined", "image_reward", "answer_conf", "loss", "shapes"}
    ir = report["metrics"]["image_reward"]["scores"]["image_reward"]
    assert ir["selected"] == pytest.approx((0.9 + 0.5 + 0.2 + 0.1 + 0.3 + 0.4) / 6)
    assert ir["all"] == pytest.approx((sum(IR0) + 0.7) / 8)
    shapes = report["metrics"]["shapes"]["scores"]["shapes"]
    assert shapes["selected"] == pytest.approx(4 / 6) and shapes["all"] == pytest.approx(4 / 8)
    assert report["metrics"]["loss"]["value"]["selected"] == pytest.approx((0.5 + 0.7 + 1.0 + 1.5 + 2.0 + 0.5) / 6)

    # a second run needs --overwrite, and then replaces the tree
    with pytest.raises(DataError, match="--overwrite"):
        write_selection(run_dir, "loss", 1, out)
    write_selection(run_dir, "loss", 1, out, overwrite=True)
    assert [p.name for p in (out / "00000" / "samples").iterdir()] == ["00000.png"]
    assert json.loads((out / "00000" / "metadata.jsonl").read_text())["selection"]["source_indices"] == [1]


def test_default_out_is_beside_the_run(run_dir):
    report = write_selection(run_dir, "image_reward", 1)
    assert Path(report["out"]) == run_dir.with_name(run_dir.name + "_image_reward_verified")
    assert (Path(report["out"]) / "00001" / "metadata.jsonl").is_file()


def test_reference_resumed_layout_and_missing_scores(tmp_path):
    root = tmp_path / "run"
    folder = make_prompt(root, 0, P0, IR0, None)
    # a resumed reference run: metadata covers only samples 4 and 5, all_ir_scores only those two
    meta = json.loads((folder / "metadata.jsonl").read_text())
    meta["text_responses"] = {k: v for k, v in meta["text_responses"].items() if k in ("4", "5")}
    meta["all_ir_scores"] = [0.7, 0.8]
    (folder / "metadata.jsonl").write_text(json.dumps(meta))
    run = read_prompt_folder(folder)
    assert [s.scores.get("image_reward") for s in run.samples] == [None, None, None, None, 0.7, 0.8]
    assert select(run, "answer_conf", 4) == [5, 4]
    report = write_selection(root, "answer_conf", 4, tmp_path / "o")
    assert report["unscored"] == {"00000": 4} and report["short"] == {"00000": 2}
    with pytest.raises(DataError, match="sample 0 has no image_reward score"):
        select(run, "image_reward", 4)

    del meta["text_responses"]["4"]["yes_conf_score"]
    (folder / "metadata.jsonl").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"sample 4 has no 'yes_conf_score'; metric answer_conf"):
        write_selection(root, "answer_conf", 4, tmp_path / "o2")
    with pytest.raises(DataError, match="--metric nope: unknown"):
        write_selection(root, "nope", 4, tmp_path / "o3")


def test_unreadable_prompts_are_skipped_and_reported(run_dir, tmp_path):
    (run_dir / "00002" / "samples").mkdir(parents=True)  # generation never finished
    runs, skipped = read_run(run_dir)
    assert [r.index for r in runs] == [0, 1]
    assert skipped[0]["folder"] == "00002" and "missing" in skipped[0]["reason"]
    with pytest.raises(DataError, match="no prompt folders"):
        read_run(tmp_path / "2_verify_scale_latent" / "00000" / "samples")


def test_verify_never_deletes_a_user_folder_named_like_its_temporary_tree(run_dir, tmp_path):
    out = tmp_path / "selected"
    mine = tmp_path / "selected.partial"  # the name the temporary tree used to have
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    stale = tmp_path / ".selected.partial-killed"  # what a killed verify leaves: marked as ours
    stale.mkdir()
    (stale / ".srae-verify-partial").write_text("")
    write_selection(run_dir, "loss", 1, out)
    assert (mine / "notes.txt").read_text() == "mine"
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".selected")) == []
    assert not (out / ".srae-verify-partial").exists() and (out / "report.json").is_file()


def test_verify_waits_for_nobody_while_scale_writes_the_run(run_dir, tmp_path):
    from scale_rae_core.runlock import FolderInUseError, RunLock

    with RunLock(run_dir), pytest.raises(FolderInUseError, match="is in use by"):
        write_selection(run_dir, "loss", 1, tmp_path / "selected")
    assert not (tmp_path / "selected").exists()


# ------------------------------------------------------------------------------------------ per-sample fields, failures, layouts


def test_seeds_and_every_per_sample_field_follow_the_renumbered_samples(tmp_path):
    root = tmp_path / "run"
    folder = make_prompt(root, 0, P0, IR0, SHAPES0)
    meta = json.loads((folder / "metadata.jsonl").read_text())
    meta["seeds"] = [42, 43, 44, 45, 46, 47]  # srae scale: sample k was made from seed 42 + k
    (folder / "metadata.jsonl").write_text(json.dumps(meta))
    write_selection(root, "combined", 4, tmp_path / "o")
    kept = json.loads((tmp_path / "o" / "00000" / "metadata.jsonl").read_text())
    assert kept["selection"]["source_indices"] == [3, 0, 1, 2]
    assert kept["seeds"] == [45, 42, 43, 44] == kept["selection"]["seeds"]  # 00000.png is the seed-45 sample
    assert kept["scores"]["image_reward"] == [0.5, 0.1, 0.9, -0.3] and kept["scores"]["shapes"] == [1, 1, 0, 0]
    assert [kept["text_responses"][str(j)]["prompt_loss"] for j in range(4)] == [3.0, 2.0, 0.5, 1.0]
    assert kept["n_samples_generated"] == 4 and kept["selection"]["source_samples"] == 6


def test_failed_prompts_are_written_as_empty_folders_with_their_reason_and_counted(run_dir, tmp_path):
    from tests.infer.test_layouts import geneval_discover

    (run_dir / "00002" / "samples").mkdir(parents=True)  # generation never wrote its metadata
    failed = make_prompt(run_dir, 3, {}, [], None)  # srae scale: the prompt could not be asked
    meta = json.loads((failed / "metadata.jsonl").read_text())
    (failed / "metadata.jsonl").write_text(json.dumps({**meta, "srae_failed": "prompt 'x'…: longer than the 2048 tokens"}))
    unverified = make_prompt(run_dir, 4, {}, [0.1, 0.2], None)  # samples, but no self-verification scores
    meta = json.loads((unverified / "metadata.jsonl").read_text())
    (unverified / "metadata.jsonl").write_text(json.dumps({**meta, "text_responses": {}}))
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["verify", str(run_dir), "--metric", "answer_conf", "--keep", "2", "--out", str(out),
                                      "--layout", "geneval"])
    assert result.exit_code == 0, result.output
    assert "5 prompts, 3 failed" in result.output and "failed 00003 (no samples in the output)" in result.output
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["failed"]) == ["00002", "00003", "00004"] and report["prompts"] == 5
    assert "metadata.jsonl: missing" in report["failed"]["00002"]
    assert report["failed"]["00003"] == "prompt 'x'…: longer than the 2048 tokens"
    assert "no sample has the scores metric answer_conf needs" in report["failed"]["00004"]
    for name in ("00002", "00003", "00004"):
        assert list((out / name / "samples").iterdir()) == []
        assert json.loads((out / name / "metadata.jsonl").read_text())["srae_failed"] == report["failed"][name]
    assert json.loads((out / "00003" / "metadata.jsonl").read_text())["tag"] == "single_object"  # the line is kept
    # GenEval's own discovery reads every folder (none lacks its metadata) and finds the selected images only
    assert sorted(Path(p).relative_to(out).as_posix() for p, _ in geneval_discover(out)) == [
        "00000/samples/00000.png", "00000/samples/00001.png", "00001/samples/00000.png", "00001/samples/00001.png"]


def test_verify_geneval_layout_refuses_prompts_without_genevals_fields(tmp_path):
    root = tmp_path / "run"
    make_prompt(root, 0, P0, IR0, None, line={"prompt": "a red circle"})  # srae scale of a plain text prompt file
    with pytest.raises(DataError) as err:
        write_selection(root, "answer_conf", 1, tmp_path / "o", layout="geneval")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{root / '00000' / 'metadata.jsonl'}: lacks GenEval's 'tag' and 'include';")
    assert not (tmp_path / "o").exists()
    assert write_selection(root, "answer_conf", 1, tmp_path / "o")["failed"] == {}  # the plain tree needs no GenEval fields


def test_verify_dpg_layout_writes_the_best_four_as_a_grid_named_by_the_item_id(tmp_path):
    root = tmp_path / "run"
    make_prompt(root, 0, P0, IR0, SHAPES0, line={"item_id": "countbench3", "prompt": "three cats"})
    few = {name: values[:2] for name, values in P0.items()}
    make_prompt(root, 1, few, [0.3, 0.4], None, line={"item_id": "whoops1", "prompt": "a cat"})
    with pytest.raises(Exception, match="--keep 2: --layout dpg makes a 2x2 grid of 4 samples per prompt; pass --keep 4"):
        write_selection(root, "combined", 2, tmp_path / "o", layout="dpg")
    report = write_selection(root, "combined", 4, tmp_path / "o", layout="dpg")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["countbench3.png", "report.json"]
    assert report["failed"] == {"whoops1": f"{root / '00001'}: 2 samples; a DPG-Bench grid needs 4"}
    assert report["items"]["countbench3"]["source_indices"] == [3, 0, 1, 2]
    grid = Image.open(tmp_path / "o" / "countbench3.png").convert("RGB")
    assert grid.size == (16, 16)
    for j, k in enumerate([3, 0, 1, 2]):  # tile j (row by row) is the j-th best sample
        tile = grid.crop(((j % 2) * 8, (j // 2) * 8, (j % 2) * 8 + 8, (j // 2) * 8 + 8))
        assert tile.tobytes() == Image.open(root / "00000" / "samples" / f"{k:05d}.png").convert("RGB").tobytes()
