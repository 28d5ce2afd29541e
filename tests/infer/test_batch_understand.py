"""`srae understand --questions-file`: many questions, one model load, batched; the same answers as one call per
question; resumable; bad lines rejected one line each while the rest are answered."""

from __future__ import annotations

import json

import pytest

from scale_rae_core.config import load_profile
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.infer.understand import answer_questions_file, understand_image
from scale_rae_core.shapes.synth import ShapeSpec, render

SHAPES = [("red", "circle", "left"), ("blue", "square", "right"), ("green", "triangle", "center"),
          ("yellow", "circle", "right"), ("red", "square", "center")]


@pytest.fixture(scope="module")
def session():
    from scale_rae_core.infer.loading import bundled_model

    with Session.open(str(bundled_model()), load_profile("tiny-cpu")) as opened:
        yield opened


@pytest.fixture
def questions(tmp_path):
    """Q.jsonl in tmp/q/ with images in tmp/q/img/ (relative paths), ids on some lines only."""
    (tmp_path / "q" / "img").mkdir(parents=True)
    lines = []
    for k, (colour, shape, position) in enumerate(SHAPES):
        render(ShapeSpec(colour, shape, position, "large")).save(tmp_path / "q" / "img" / f"{k}.png")
        line = {"image": f"img/{k}.png", "question": "What colour is the shape?" if k % 2 else "What shape is in the image?"}
        lines.append(line | ({"id": f"q{k}"} if k < 3 else {}))
    path = tmp_path / "q" / "Q.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_questions_file_is_answered_in_batches_as_one_call_per_question_would(session, questions, tmp_path):
    answers = tmp_path / "out" / "answers.jsonl"
    result = answer_questions_file(session, questions, answers, batch_size=2, max_new_tokens=8)
    assert (result.answered, result.skipped, result.rejected, result.rejects) == (5, 0, 0, None)
    records = _records(answers)
    assert [r["id"] for r in records] == ["q0", "q1", "q2", "4", "5"]  # the line number where no id is given
    assert [r["batch"] for r in records] == [2, 2, 2, 2, 1] and all(r["seconds"] > 0 for r in records)
    for k, record in enumerate(records):
        single = understand_image(session, questions.parent / f"img/{k}.png", record["question"], tmp_path / "one",
                                  SamplerSettings(steps=2), max_new_tokens=8)
        assert record["answer"] == single.text and record["image"] == f"img/{k}.png"
    assert [r["answer"] for r in records][:2] == ["circle", "blue"]  # the bundled model knows its world


def test_a_rerun_skips_answered_ids_and_redoes_a_line_cut_off_by_an_interruption(session, questions, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answer_questions_file(session, questions, answers, batch_size=4, max_new_tokens=8)
    again = answer_questions_file(session, questions, answers, max_new_tokens=8)
    assert (again.answered, again.skipped) == (0, 5) and len(_records(answers)) == 5
    kept = answers.read_text().splitlines()[:2]
    answers.write_text("\n".join(kept) + "\n" + '{"id": "q2", "image": "img/2.png", "ans')  # killed mid-line
    resumed = answer_questions_file(session, questions, answers, batch_size=4, max_new_tokens=8)
    assert (resumed.answered, resumed.skipped) == (3, 2)
    assert sorted(r["id"] for r in _records(answers)) == ["4", "5", "q0", "q1", "q2"]
    answers.write_text("not an answers file\n")
    with pytest.raises(DataError, match="is not JSON; it is not an answers file, pass another --out"):
        answer_questions_file(session, questions, answers)


def test_bad_lines_are_rejected_one_line_each_and_the_rest_answered(session, questions, tmp_path):
    good = questions.read_text().splitlines()
    bad = ["{not json", json.dumps({"question": "What is it?"}), json.dumps({"image": "img/0.png", "question": 3}),
           json.dumps({"id": "q0", "image": "img/1.png", "question": "again?"}),
           json.dumps({"image": "img/missing.png", "question": "What is it?"}),
           json.dumps({"image": "img/0.png", "question": "<image> and <image>?"}), json.dumps([1, 2])]
    questions.write_text("\n".join([good[0], *bad, *good[1:]]) + "\n\n")
    answers = tmp_path / "answers.jsonl"
    result = answer_questions_file(session, questions, answers, batch_size=3, max_new_tokens=8)
    assert (result.answered, result.rejected) == (5, 7) and result.rejects == tmp_path / "answers.rejects.jsonl"
    rejects = _records(result.rejects)
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6, 7, 8]
    errors = [r["error"] for r in rejects]
    assert errors[0] == "not JSON" and "\"image\" must be a non-empty string" in errors[1]
    assert "\"question\" must be a non-empty string" in errors[2] and "id 'q0' repeats line 1" in errors[3]
    assert errors[4].startswith("image ") and "missing.png: not found" in errors[4]
    assert "several <image> markers" in errors[5] and "not a JSON object" in errors[6]
    assert all("\n" not in e for e in errors)
    questions.write_text("\n".join(good) + "\n")  # fixed: the rerun has nothing to reject and leaves no stale file
    assert answer_questions_file(session, questions, answers).rejects is None and not result.rejects.exists()


def test_the_cli_answers_a_questions_file_and_refuses_mixed_arguments(questions, tmp_path):
    from typer.testing import CliRunner

    from scale_rae_cli.main import app

    run = CliRunner().invoke
    res = run(app, ["understand", "--questions-file", str(questions), "--out", str(tmp_path / "a.jsonl"),
                    "--batch-size", "3", "--max-new-tokens", "8", "-q"])
    assert res.exit_code == 0, res.output
    assert "5 answered, 0 already answered -> " in res.output and len(_records(tmp_path / "a.jsonl")) == 5
    res = run(app, ["understand", "--questions-file", str(questions), "--out", str(tmp_path / "folder"), "-q"])
    assert res.exit_code == 0 and (tmp_path / "folder" / "answers.jsonl").is_file()
    for args, message in (([], "error: pass IMAGE and QUESTION (or --questions-file FILE for many)"),
                          (["x.png", "What?", "--questions-file", str(questions)],
                           "error: pass IMAGE QUESTION or --questions-file FILE, not both"),
                          (["--questions-file", str(tmp_path / "none.jsonl")], "error: --questions-file")):
        res = run(app, ["understand", *args])
        assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith(message), res.output
    with pytest.raises(ConfigError, match="--batch-size 0"):
        answer_questions_file(None, questions, tmp_path / "x.jsonl", batch_size=0)
