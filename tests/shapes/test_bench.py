"""The shapes benchmark: fixed prompt set, held-out images, answer normalisation, rates on a tiny random model,
the best-of-k selection against a hand-computed one, the figures' 95% intervals and the confusion counts from known
readings, and `srae eval shapes` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scale_rae_core.config import load_profile
from scale_rae_core.errors import ConfigError
from scale_rae_core.eval.intervals import cluster_bootstrap, wilson
from scale_rae_core.infer.pipeline import Session
from scale_rae_core.shapes.bench import (
    SETTINGS_FILE,
    bench_prompts,
    confusion,
    generation_figures,
    heldout_specs,
    normalise_answer,
    percent,
    run_benchmark,
    table_rows,
)
from scale_rae_core.shapes.scorer import parse_prompt, read_image
from scale_rae_core.shapes.synth import COLOURS, POSITIONS, SHAPES, render
from tests.infer.helpers import build_tiny, write_decoder, write_export
from tests.shapes.records import prompt_row, record


def test_prompt_set_is_fixed_complete_and_parsable():
    prompts = bench_prompts()
    assert len(prompts) == len(set(prompts)) == len(COLOURS) * len(SHAPES) * len(POSITIONS) == 36
    assert prompts == bench_prompts()  # deterministic
    parsed = [parse_prompt(p) for p in prompts]
    assert {(p["colour"], p["shape"], p["position"]) for p in parsed} == {
        (c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS}
    assert all(p["size"] is None for p in parsed)
    assert len({(p["colour"], p["shape"]) for p in parsed[:12]}) == 12  # a prefix of 12 holds every colour x shape
    assert bench_prompts(5) == prompts[:5]
    with pytest.raises(ConfigError, match="--n-prompts 37"):
        bench_prompts(37)


def test_heldout_images_are_deterministic_and_read_back():
    specs = heldout_specs(12, seed=0)
    assert specs == heldout_specs(12, seed=0) and specs != heldout_specs(12, seed=1)
    for spec in specs:  # rendered held-out images are what they claim: the scorer reads them back
        r = read_image(render(spec, 64))
        assert (r.colour, r.shape, r.position) == (spec.colour, spec.shape, spec.position)


@pytest.mark.parametrize("text, word", [
    ("Red.", "red"), ("  CIRCLE ", "circle"), ("centre", "center"), ("middle!", "center"), ("big", "large"),
    ("a red circle", "a red circle"),
])
def test_normalise_answer(text, word):
    assert normalise_answer(text) == word


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model, tok = build_tiny(tmp)
    return {"export": write_export(model, tok, tmp / "export"), "decoder": write_decoder(tmp / "decoder")}


def test_benchmark_on_a_tiny_model(files, tmp_path):
    session = Session.open(str(files["export"]), load_profile("tiny-cpu"), decoder=str(files["decoder"]))
    out = tmp_path / "bench.json"
    result = run_benchmark(session, out, n_prompts=3, k=2, n_images=2, seed=0, steps=2)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    g, u = result["generation"], result["understanding"]
    assert g["n_prompts"] == 3 and g["k"] == 2 and len(g["prompts"]) == 3
    for row in g["prompts"]:
        assert [s["index"] for s in row["samples"]] == [0, 1] and row["selected"] in (0, 1)
    # rates are recomputed here from the per-sample verdicts
    first = [row["samples"][0]["full"] for row in g["prompts"]]
    chosen = [row["samples"][row["selected"]]["full"] for row in g["prompts"]]
    every = [s["colour"] for row in g["prompts"] for s in row["samples"]]
    assert g["first"]["full"] == pytest.approx(sum(first) / 3)
    assert g["best_of_k"]["full"] == pytest.approx(sum(chosen) / 3)
    assert g["mean_over_k"]["colour"] == pytest.approx(sum(every) / 6)
    assert g["gain"] == pytest.approx(g["best_of_k"]["full"] - g["mean_over_k"]["full"])
    assert g["oracle_best_of_k"] >= max(g["first"]["full"], g["best_of_k"]["full"])
    assert u["n_images"] == 2 and u["n_questions"] == 8
    assert u["accuracy"] == pytest.approx(sum(q["correct"] for i in u["images"] for q in i["qa"]) / 8)
    assert set(u["by_attribute"]) == {"colour", "shape", "position", "size"}
    assert len(table_rows(result)) == 5
    # every figure has its interval next to it, computed from the same verdicts
    assert g["first_ci95"]["full"] == list(wilson(sum(first), 3)) and g["best_of_k_ci95"]["full"] == list(wilson(sum(chosen), 3))
    assert g["mean_over_k_ci95"]["colour"] == list(cluster_bootstrap([[s["colour"] for s in row["samples"]]
                                                                      for row in g["prompts"]]))
    assert g["oracle_best_of_k_ci95"] == list(wilson(round(3 * g["oracle_best_of_k"]), 3))
    lo, hi = g["gain_ci95"]
    assert lo <= g["gain"] <= hi
    assert u["accuracy_ci95"] == list(wilson(round(8 * u["accuracy"]), 8))
    assert set(u["by_attribute_ci95"]) == set(u["by_attribute"])
    # the confusion counts what the reader saw in each of the 6 samples
    for attribute in ("colour", "shape", "position"):
        cells = g["confusion"][attribute]
        assert sum(sum(row.values()) for row in cells.values()) == 6
        for row in g["prompts"]:
            asked = parse_prompt(row["prompt"])[attribute]
            seen = [s["read"][attribute] or "none" for s in row["samples"]]
            assert all(cells[asked][v] >= seen.count(v) for v in seen)
    # a re-run with the same settings resumes (same numbers); other settings start over
    again = run_benchmark(session, out, n_prompts=3, k=2, n_images=2, seed=0, steps=2)
    assert again["generation"]["first"] == g["first"] and again["generation"]["prompts"] == g["prompts"]
    marker = json.loads((out.with_suffix("") / SETTINGS_FILE).read_text())
    assert marker["decoder"] == session.decoder()[1].describe()["id"]  # another --decoder starts over too
    fewer = run_benchmark(session, out, n_prompts=2, k=1, n_images=1, seed=0, steps=2)
    assert fewer["generation"]["n_prompts"] == 2 and all(len(p["samples"]) == 1 for p in fewer["generation"]["prompts"])
    with pytest.raises(ConfigError, match="ending in .json"):
        run_benchmark(session, tmp_path / "bench.txt", n_prompts=1, k=1, n_images=1)


def test_selection_uses_the_models_yes_answer(files, tmp_path, monkeypatch):
    """best-of-k picks a sample the model answered "yes" for, over an earlier "no"."""
    import scale_rae_core.scale.run as run_mod

    calls = {"n": 0}
    real = run_mod.self_verify

    def fake(*args, **kwargs):
        record = real(*args, **kwargs)
        calls["n"] += 1
        yes = calls["n"] % 2 == 0  # sample 1 of each prompt says yes, sample 0 says no
        record.update(answer="yes" if yes else "no", score=1 if yes else 0, yes_conf_score=1.0 if yes else 0.0)
        return record

    monkeypatch.setattr(run_mod, "self_verify", fake)
    session = Session.open(str(files["export"]), load_profile("tiny-cpu"), decoder=str(files["decoder"]))
    result = run_benchmark(session, tmp_path / "b.json", n_prompts=2, k=2, n_images=1, steps=2, selector="answer_conf")
    assert [p["selected"] for p in result["generation"]["prompts"]] == [1, 1]
    assert [p["answers"] for p in result["generation"]["prompts"]] == [["no", "yes"], ["no", "yes"]]
    # another self-verification metric re-selects from the same samples: lowest caption loss of the prompt
    calls["n"] = 0
    by_loss = run_benchmark(session, tmp_path / "b.json", n_prompts=2, k=2, n_images=1, steps=2)  # the default
    assert by_loss["generation"]["selector"] == "loss" and calls["n"] == 0  # nothing regenerated
    assert by_loss["generation"]["verify_on"] == "image"  # read from the decoded picture, re-encoded
    for row in by_loss["generation"]["prompts"]:
        meta = json.loads((Path(row["folder"]) / "metadata.jsonl").read_text())
        losses = [meta["text_responses"][str(k)]["prompt_loss"] for k in (0, 1)]
        assert row["selected"] == losses.index(min(losses))
    with pytest.raises(ConfigError, match="--select image_reward: choose one of answer_conf"):
        run_benchmark(session, tmp_path / "b.json", n_prompts=2, k=2, n_images=1, steps=2, selector="image_reward")


def test_cli_eval_shapes(files, tmp_path):
    from typer.testing import CliRunner

    from scale_rae_cli.main import app

    out = tmp_path / "s.json"
    res = CliRunner().invoke(app, ["eval", "shapes", "--model", str(files["export"]), "--decoder", str(files["decoder"]),
                                   "--out", str(out), "--n-prompts", "1", "--k", "1", "--n-images", "1", "--steps", "2",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    assert "shapes benchmark" in res.output and "first sample" in res.output and f"wrote {out}" in res.output
    assert json.loads(out.read_text())["generation"]["n_prompts"] == 1
    res = CliRunner().invoke(app, ["eval", "shapes", "--model", str(files["export"]), "--decoder", str(files["decoder"]),
                                   "--out", str(out), "--n-prompts", "1", "--k", "1", "--n-images", "1", "--steps", "2",
                                   "--quiet", "--verify-on", "image", "--select", "loss"])
    assert res.exit_code == 0, res.output
    g = json.loads(out.read_text())["generation"]
    assert (g["verify_on"], g["selector"]) == ("image", "loss") and "best of 1 by loss" in res.output
    assert (out.with_suffix("") / "samples" / "bench" / "1_verify_scale_image").is_dir()
    res = CliRunner().invoke(app, ["eval", "shapes", "--model", str(files["export"]), "--decoder", str(files["decoder"]),
                                   "--out", str(out), "--n-prompts", "99", "--quiet"])
    assert res.exit_code == 1 and res.output.startswith("error: --n-prompts 99") and res.output.count("\n") == 1
    assert "Example" in CliRunner().invoke(app, ["eval", "shapes", "--help"]).output


# known readings: 4 prompts x 3 samples; "full" per sample is [1,0,0] [1,1,0] [1,1,1] [0,1,0], picks 0, 2, 1, 1
KNOWN = [("a red circle on the left", [("red", "circle", "left"), ("red", "square", "left"), (None, None, None)], 0),
         ("a green square on the left", [("green", "square", "left")] * 2 + [("blue", "square", "center")], 2),
         ("a blue triangle on the left", [("blue", "triangle", "left")] * 3, 1),
         ("a yellow circle on the left", [("red", "circle", "right"), ("yellow", "circle", "left"),
                                          ("yellow", "triangle", "left")], 1)]


def known_rows():
    return [prompt_row(p, seen, selected) for p, seen, selected in KNOWN]


def test_confusion_counts_what_was_seen_for_what_was_asked():
    pairs = [({"colour": "red", "shape": "circle", "position": "left"}, {"colour": "red", "shape": "square", "position": "left"}),
             ({"colour": "red", "shape": "circle", "position": "left"}, {"colour": None, "shape": None, "position": None}),
             ({"colour": "blue", "shape": "circle", "position": "right"}, {"colour": "red", "shape": "circle", "position": "right"})]
    got = confusion(pairs)
    assert got["colour"] == {"red": {"red": 1, "green": 0, "blue": 0, "yellow": 0, "none": 1},  # rows: asked, world order
                             "blue": {"red": 1, "green": 0, "blue": 0, "yellow": 0, "none": 0}}
    assert got["shape"] == {"circle": {"circle": 1, "square": 1, "triangle": 0, "none": 1}}
    assert got["position"] == {"left": {"left": 1, "center": 0, "right": 0, "none": 1},
                               "right": {"left": 0, "center": 0, "right": 1, "none": 0}}
    assert list(got["colour"]) == ["red", "blue"] and confusion([]) == {"colour": {}, "shape": {}, "position": {}}


def test_generation_figures_intervals_and_confusion_from_known_readings():
    g = generation_figures(known_rows())
    full = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    assert (g["first"]["full"], g["best_of_k"]["full"], g["oracle_best_of_k"]) == (0.75, 0.75, 1.0)
    assert g["mean_over_k"]["full"] == pytest.approx(7 / 12) and g["mean_over_k"]["colour"] == pytest.approx(9 / 12)
    assert g["gain"] == pytest.approx(1 / 6)
    # one trial per prompt: Wilson; the k samples of a prompt pooled: the prompt bootstrap; the gain: paired per prompt
    assert g["first_ci95"]["full"] == list(wilson(3, 4)) and g["best_of_k_ci95"]["shape"] == list(wilson(4, 4))  # picks all right in shape
    assert g["oracle_best_of_k_ci95"] == list(wilson(4, 4))
    assert g["mean_over_k_ci95"]["full"] == list(cluster_bootstrap(full))
    assert g["gain_ci95"] == list(cluster_bootstrap([[1 - 1 / 3], [0 - 2 / 3], [1 - 1.0], [1 - 1 / 3]]))
    # the same in colour + shape, the gain: per prompt, the pick's colour+shape minus the prompt's rate
    rows = known_rows()
    paired = [[float(r["samples"][r["selected"]]["colour_shape"]) - sum(x["colour_shape"] for x in r["samples"]) / len(r["samples"])]
              for r in rows]
    assert g["gain_colour_shape"] == pytest.approx(sum(d for (d,) in paired) / len(paired))
    assert g["gain_colour_shape"] == pytest.approx(g["best_of_k"]["colour_shape"] - g["mean_over_k"]["colour_shape"])
    assert g["gain_colour_shape_ci95"] == list(cluster_bootstrap(paired))
    for lo_hi, value in ((g["mean_over_k_ci95"]["full"], 7 / 12), (g["gain_ci95"], 1 / 6)):
        assert lo_hi[0] <= value <= lo_hi[1]
    none = {"none": 0}
    assert g["confusion"] == {
        "colour": {"red": {"red": 2, "green": 0, "blue": 0, "yellow": 0, "none": 1},
                   "green": {"red": 0, "green": 2, "blue": 1, "yellow": 0, **none},
                   "blue": {"red": 0, "green": 0, "blue": 3, "yellow": 0, **none},
                   "yellow": {"red": 1, "green": 0, "blue": 0, "yellow": 2, **none}},
        "shape": {"circle": {"circle": 3, "square": 1, "triangle": 1, "none": 1},
                  "square": {"circle": 0, "square": 3, "triangle": 0, **none},
                  "triangle": {"circle": 0, "square": 0, "triangle": 3, **none}},
        "position": {"left": {"left": 9, "center": 1, "right": 1, "none": 1}},
    }
    assert json.loads(json.dumps(g)) == g  # plain JSON: lists, not tuples


def test_table_prints_each_figure_with_its_interval(capsys):
    from scale_rae_cli.eval_shapes import print_table

    result = record(known_rows())
    rows = table_rows(result)
    lo, hi = wilson(3, 4)
    assert rows[0][0] == "first sample" and rows[0][5] == f"75.0% [{100 * lo:.1f}, {100 * hi:.1f}]" == "75.0% [30.1, 95.4]"
    assert rows[3][5] == "100.0% [51.0, 100.0]"  # oracle: 4 of 4 prompts
    assert rows[4][0] == "understanding (24 questions, size 100.0% [61.0, 100.0])" and rows[4][5] == "91.7% [74.2, 97.7]"
    assert percent(1 / 6, [-0.05, 0.4], points=True) == "+16.7 points [-5.0, +40.0]" and percent(None) == "-"
    # a record written before the intervals: the figures alone, as before
    old = table_rows(record(known_rows(), with_intervals=False))
    assert old[0][5] == "75.0%" and old[4][5] == "91.7%" and [r[0] for r in old[:4]] == [r[0] for r in rows[:4]]
    print_table(result)
    out = capsys.readouterr().out
    assert "75.0% [30.1, 95.4]" in out  # one line per cell, also when the output is not a terminal
    glo, ghi = result["generation"]["gain_ci95"]
    assert f"best of 3 by answer_conf on the latent - single sample): +16.7 points [{100 * glo:+.1f}, {100 * ghi:+.1f}]" in out
    clo, chi = result["generation"]["gain_colour_shape_ci95"]
    gain = result["generation"]["gain_colour_shape"]
    assert f"; colour+shape {100 * gain:+.1f} points [{100 * clo:+.1f}, {100 * chi:+.1f}]" in out
