"""Best-of-N selection over a scaling run, written out as a per-prompt tree (GenEval's layout) or DPG-Bench grids, with a report.

Input: a scaling run in the reference layout (``srae scale`` writes the same)::

    DIR/{index:05d}/metadata.jsonl      one JSON object: the prompt line's fields, "text_responses":
                                        {"<k>": {score, yes_logit, ..., prompt_loss, ...}},
                                        "all_ir_scores": [n], and (srae) "scores": {scorer: [n]}
    DIR/{index:05d}/samples/{k:05d}.png

Output: ``OUT/{index:05d}/metadata.jsonl`` + ``samples/{j:05d}.png`` with the K selected samples
renumbered 0..K-1 best first, every per-sample field (``text_responses``, ``scores``, ``seeds``) renumbered with
them, and ``OUT/report.json``. ``--layout geneval`` writes the same tree after checking that every prompt carries
GenEval's ``tag`` and ``include`` (GenEval's evaluation needs both); ``--layout dpg`` writes instead one 2×2 grid
``OUT/{item_id}.png`` of the 4 selected samples per prompt (``--keep 4``), see :mod:`scale_rae_core.infer.layouts`.

A prompt with nothing to select — its folder unreadable (generation never finished), its generation failed
(``srae_failed`` in its metadata) or no sample with what the metric needs — is written as a failed prompt folder
(metadata with ``srae_failed``: the reason, and an empty ``samples/``; under ``dpg``: no grid) and counted under
``failed`` in the report, never dropped silently.

Metrics (per prompt, samples sorted ascending by the key, ties broken by sample index; the reference's
keys, with ``loss`` fixed to use the real ``prompt_loss``):

=================  ====================================================================
``answer_conf``    (-score, -yes_conf_score, +no_conf_score): "yes" first, most confident yes first
``answer_logits``  (-score, -yes_logit, +no_logit)
``prompt_conf``    (-prompt_conf_score, -yes_logit, +no_logit)
``image_conf``     (-image_conf_score, -yes_logit, +no_logit)
``response_conf``  (-response_conf_score, -yes_logit, +no_logit)
``loss``           (+prompt_loss, -score, -yes_logit, +no_logit): lowest caption loss first
``image_reward``   (-ImageReward)
``combined``       mean of the sample's rank under ``image_reward`` and under ``answer_conf`` (rank 0 =
                   best), lowest first: the external judge and the model's own answer, equally weighted
any score name     (-score) for a score recorded under "scores" (e.g. ``shapes``, an oracle)
=================  ====================================================================

Where a prompt has fewer than K samples all are kept and the report lists it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale_rae_core.errors import DataError
from scale_rae_core.files import apply_umask, finite_json
from scale_rae_core.infer import layouts as L
from scale_rae_core.runlock import locked

SAMPLE_RE = re.compile(r"^(\d{5,})\.png$")
PER_SAMPLE_FIELDS = ("text_responses", "all_ir_scores", "top_ir_scores", "top_ir_indices", "scores", "seeds",
                     "n_samples_generated")
IMAGE_REWARD = "image_reward"


@dataclass
class Sample:
    index: int
    path: Path
    verify: dict[str, Any] | None  # this sample's text_responses entry
    scores: dict[str, float] = field(default_factory=dict)  # image_reward and any recorded scorer


@dataclass
class PromptRun:
    index: int
    folder: Path
    metadata: dict[str, Any]
    samples: list[Sample]  # every sample with a PNG, by index


# ----------------------------------------------------------------------------------------------- reading
def _number(value: Any, where: str) -> float:
    """A recorded score as a float: a finite JSON number, else a DataError naming where it was found."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where} is {json.dumps(value)[:40]}, not a finite number; fix or delete that prompt folder")
    return float(value)


def read_prompt_folder(folder: Path) -> PromptRun:
    """One prompt folder of a scaling run."""
    meta_path = folder / "metadata.jsonl"
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{meta_path}: missing (generation for this prompt did not finish)") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: not one JSON object ({type(e).__name__})") from e
    if not isinstance(metadata, dict):
        raise DataError(f"{meta_path}: expected one JSON object")
    pngs = sorted(
        (int(m.group(1)), p) for p in (folder / "samples").glob("*.png") if (m := SAMPLE_RE.match(p.name))
    )
    responses = metadata.get("text_responses") or {}
    if not isinstance(responses, dict):
        raise DataError(f"{meta_path}: text_responses must map sample index -> scores")
    samples = [Sample(k, p, responses.get(str(k))) for k, p in pngs]
    for s in samples:
        if s.verify is not None and not isinstance(s.verify, dict):
            raise DataError(f"{meta_path}: text_responses[{s.index}] must be an object of scores")
    indices = [s.index for s in samples]

    def attach(name: str, values: Any, order: list[int], what: str) -> None:
        if not isinstance(values, list) or len(values) != len(order):
            raise DataError(f"{meta_path}: {what} has {len(values) if isinstance(values, list) else '?'} "
                            f"values for {len(order)} samples")
        by_index = dict(zip(order, values, strict=True))
        for s in samples:
            if s.index in by_index:
                s.scores[name] = _number(by_index[s.index], f"{meta_path}: {what}[{order.index(s.index)}]")

    if "all_ir_scores" in metadata:
        ir = metadata["all_ir_scores"]
        # The reference scores the images of one run in order; after a resumed run it covers only the
        # samples that run made, which are the ones in text_responses.
        resumed = sorted(int(k) for k in responses)
        order = indices if isinstance(ir, list) and len(ir) == len(indices) else resumed
        attach(IMAGE_REWARD, ir, order, "all_ir_scores")
    scores = metadata.get("scores") or {}
    if not isinstance(scores, dict):
        raise DataError(f"{meta_path}: scores must map scorer name -> [one score per sample]")
    for name, values in scores.items():
        attach(name, values, indices, f"scores.{name}")
    return PromptRun(int(folder.name), folder, metadata, samples)


def read_run(directory: Path) -> tuple[list[PromptRun], list[dict[str, str]]]:
    """Every prompt folder of a run; folders that cannot be read are returned as skipped, with the reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    folders = sorted((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not folders:
        raise DataError(f"{directory}: no prompt folders ({{index:05d}}/metadata.jsonl + samples/); pass the run directory")
    runs, skipped = [], []
    for folder in folders:
        try:
            runs.append(read_prompt_folder(folder))
        except DataError as e:
            skipped.append({"folder": folder.name, "reason": str(e)})
    return runs, skipped


# ----------------------------------------------------------------------------------------------- metrics
def _v(sample: Sample, key: str, metric: str, folder: Path) -> float:
    if sample.verify is None:
        raise DataError(f"{folder}: sample {sample.index} has no text_responses entry; metric {metric} needs self-verification scores")
    if key not in sample.verify:
        raise DataError(f"{folder}: sample {sample.index} has no {key!r}; metric {metric} needs it (pick another --metric)")
    return _number(sample.verify[key], f"{folder / 'metadata.jsonl'}: text_responses[{sample.index}].{key}")


def _s(sample: Sample, name: str, metric: str, folder: Path) -> float:
    if name not in sample.scores:
        raise DataError(f"{folder}: sample {sample.index} has no {name} score; metric {metric} needs it")
    return sample.scores[name]


# name -> (sort key, the value shown in the report). Keys are ascending; the sample index breaks ties.
_VERIFY_KEYS: dict[str, tuple[tuple[str, int], ...]] = {
    "answer_conf": (("score", -1), ("yes_conf_score", -1), ("no_conf_score", 1)),
    "answer_logits": (("score", -1), ("yes_logit", -1), ("no_logit", 1)),
    "prompt_conf": (("prompt_conf_score", -1), ("yes_logit", -1), ("no_logit", 1)),
    "image_conf": (("image_conf_score", -1), ("yes_logit", -1), ("no_logit", 1)),
    "response_conf": (("response_conf_score", -1), ("yes_logit", -1), ("no_logit", 1)),
    "loss": (("prompt_loss", 1), ("score", -1), ("yes_logit", -1), ("no_logit", 1)),
}
_SHOWN = {
    "answer_conf": "yes_conf_score", "answer_logits": "yes_logit", "prompt_conf": "prompt_conf_score",
    "image_conf": "image_conf_score", "response_conf": "response_conf_score", "loss": "prompt_loss",
}
BUILTIN_METRICS = ("combined", IMAGE_REWARD, *_VERIFY_KEYS)
SELF_VERIFICATION_METRICS = tuple(_VERIFY_KEYS)  # metrics from the model's own scores only


def _uses_verify(metric: str) -> bool:
    return metric in _VERIFY_KEYS or metric == "combined"


def candidates(run: PromptRun, metric: str) -> list[Sample]:
    """Samples a metric can rank: those with self-verification scores for verify-based metrics."""
    if _uses_verify(metric):
        return [s for s in run.samples if s.verify is not None]
    return list(run.samples)


def metric_values(run: PromptRun, metric: str) -> dict[int, float]:
    """The per-sample value a metric is about (shown in the report), by sample index."""
    pool = candidates(run, metric)
    if metric in _SHOWN:
        return {s.index: _v(s, _SHOWN[metric], metric, run.folder) for s in pool}
    if metric == "combined":
        return _combined_ranks(run, pool)
    return {s.index: _s(s, metric, metric, run.folder) for s in pool}


def _order(run: PromptRun, pool: list[Sample], metric: str) -> list[int]:
    if metric in _VERIFY_KEYS:
        spec = _VERIFY_KEYS[metric]

        def key(s: Sample) -> tuple[float, ...]:
            return (*(sign * _v(s, name, metric, run.folder) for name, sign in spec), s.index)
    elif metric == "combined":
        ranks = _combined_ranks(run, pool)

        def key(s: Sample) -> tuple[float, ...]:
            return (ranks[s.index], s.index)
    else:
        def key(s: Sample) -> tuple[float, ...]:
            return (-_s(s, metric, metric, run.folder), s.index)
    return [s.index for s in sorted(pool, key=key)]


def _combined_ranks(run: PromptRun, pool: list[Sample]) -> dict[int, float]:
    by_ir = _order(run, pool, IMAGE_REWARD)
    by_answer = _order(run, pool, "answer_conf")
    ir_rank = {k: r for r, k in enumerate(by_ir)}
    answer_rank = {k: r for r, k in enumerate(by_answer)}
    return {k: (ir_rank[k] + answer_rank[k]) / 2 for k in ir_rank}


def select(run: PromptRun, metric: str, keep: int) -> list[int]:
    """Indices of the ``keep`` best samples under ``metric``, best first (all of them if fewer)."""
    if keep < 1:
        raise DataError(f"--keep must be at least 1, got {keep}")
    return _order(run, candidates(run, metric), metric)[:keep]


def known_metrics(runs: list[PromptRun]) -> list[str]:
    """Built-in metrics plus every score name recorded in the run."""
    names = {name for run in runs for s in run.samples for name in s.scores}
    return [*BUILTIN_METRICS, *sorted(names - set(BUILTIN_METRICS))]


# ----------------------------------------------------------------------------------------------- writing
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare_metrics(runs: list[PromptRun], keep: int) -> dict[str, dict[str, Any]]:
    """For every metric the run supports: its own value and every recorded score, selected vs all."""
    score_names = sorted({name for run in runs for s in run.samples for name in s.scores})
    table: dict[str, dict[str, Any]] = {}
    for metric in known_metrics(runs):
        try:
            value_sel: list[float] = []
            value_all: list[float] = []
            score_sel: dict[str, list[float]] = {n: [] for n in score_names}
            score_all: dict[str, list[float]] = {n: [] for n in score_names}
            for run in runs:
                chosen = select(run, metric, keep)
                values = metric_values(run, metric)
                value_sel += [values[k] for k in chosen]
                value_all += list(values.values())
                by_index = {s.index: s for s in candidates(run, metric)}
                for name in score_names:
                    score_sel[name] += [by_index[k].scores[name] for k in chosen if name in by_index[k].scores]
                    score_all[name] += [s.scores[name] for s in by_index.values() if name in s.scores]
        except DataError:
            continue  # this run lacks what the metric needs
        table[metric] = {
            "value": {"selected": _mean(value_sel), "all": _mean(value_all)},
            "scores": {n: {"selected": _mean(score_sel[n]), "all": _mean(score_all[n])} for n in score_names},
        }
    return table


def write_selection(
    directory: Path, metric: str, keep: int, out: Path | None = None, overwrite: bool = False,
    layout: str | None = None,
) -> dict[str, Any]:
    """Select ``keep`` samples per prompt by ``metric``, write the tree (or ``layout``) + report.json; return the report."""
    directory = Path(directory)
    runs, skipped = read_run(directory)
    if not runs:
        raise DataError(f"{directory}: no prompt folder could be read (first: {skipped[0]['reason']})")
    if metric not in known_metrics(runs):
        raise DataError(f"--metric {metric}: unknown; choose one of {', '.join(known_metrics(runs))}")
    if layout == "dpg":
        L.check_dpg_count(keep, "--keep")
    L.check_layout([(str(run.folder / "metadata.jsonl"), run.metadata) for run in runs], layout)
    out = Path(out) if out is not None else directory.with_name(f"{directory.name}_{metric}_verified")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder; pass a folder path")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: exists and is not empty; pass --overwrite or another --out")
        if not (out / "report.json").is_file():
            raise DataError(f"{out}: not an srae verify output (no report.json); refusing to overwrite it")
    with locked(directory, flag="DIRECTORY (a running `srae scale` writes it)"):
        return _write_tree(directory, runs, skipped, metric, keep, out, layout)


PARTIAL_MARK = ".srae-verify-partial"  # inside the temporary tree, so a stale one can be told from a user folder


def _write_tree(directory: Path, runs: list[Any], skipped: list[dict[str, Any]], metric: str, keep: int,
                out: Path, layout: str | None) -> dict[str, Any]:
    """Write the selected tree under a fresh temporary folder beside ``out`` and rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed verify: ours by the mark only
        if (stale / PARTIAL_MARK).is_file():
            shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (partial / PARTIAL_MARK).write_text("")
    try:
        report = _fill_tree(partial, directory, runs, skipped, metric, keep, out, layout)
        (partial / PARTIAL_MARK).unlink()
        apply_umask(partial)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _fill_tree(partial: Path, directory: Path, runs: list[Any], skipped: list[dict[str, Any]], metric: str,
               keep: int, out: Path, layout: str | None) -> dict[str, Any]:
    short: dict[str, int] = {}
    unscored: dict[str, int] = {}
    failed: dict[str, str] = {}
    items: dict[str, dict[str, Any]] = {}  # dpg: what each grid holds
    for item in skipped:  # unreadable: nothing is known but the folder and why
        failed[item["folder"]] = item["reason"]
        if layout != "dpg":
            L.write_failed(partial / item["folder"], {}, item["reason"])
    for run in runs:
        chosen = select(run, metric, keep)  # raises a DataError naming the folder if it lacks a score
        name = f"{run.index:05d}"
        if run.samples and len(chosen) < keep:
            short[name] = len(chosen)
        missing = len(run.samples) - len(candidates(run, metric))
        if missing:
            unscored[name] = missing
        reason = _failure(run, chosen, metric, keep, layout)
        meta = {key: v for key, v in run.metadata.items() if key not in PER_SAMPLE_FIELDS and key != L.FAILED}
        if reason is not None:
            failed[name if layout != "dpg" else str(L.dpg_id(run.metadata))] = reason
            if layout != "dpg":
                L.write_failed(partial / name, meta, reason)
            continue
        selection = _selection(run, metric, keep, chosen)
        if layout == "dpg":
            tiles = [L.read_rgb(run_sample(run, k).path) for k in chosen]
            L.save_image(L.dpg_grid(tiles), partial / f"{L.dpg_id(run.metadata)}.png")
            items[str(L.dpg_id(run.metadata))] = {"prompt": run.metadata.get("prompt"), **selection}
        else:
            _write_selected(partial / name, run, chosen, meta, selection)

    counts = [len(run.samples) for run in runs]
    report = {
        "source": str(directory),
        "out": str(out),
        "layout": layout,
        "metric": metric,
        "keep": keep,
        "prompts": len(runs) + len(skipped),
        "samples_per_prompt": {"min": min(counts), "max": max(counts)},
        "short": short,
        "unscored": unscored,
        "failed": failed,
        "metrics": compare_metrics(runs, keep),
    }
    if layout == "dpg":
        report["items"] = items
    (partial / "report.json").write_text(finite_json(report, str(out / "report.json"), indent=2) + "\n")
    return report


def run_sample(run: PromptRun, k: int) -> Sample:
    return next(s for s in run.samples if s.index == k)


def _failure(run: PromptRun, chosen: list[int], metric: str, keep: int, layout: str | None) -> str | None:
    """Why a prompt gets no samples in the output, or None."""
    if run.metadata.get(L.FAILED):
        return str(run.metadata[L.FAILED])
    if not run.samples:
        return f"{run.folder}: no samples"
    if not chosen:
        return f"{run.folder}: no sample has the scores metric {metric} needs"
    if layout == "dpg" and len(chosen) < L.DPG_TILES:
        return f"{run.folder}: {len(chosen)} samples; a DPG-Bench grid needs {L.DPG_TILES}"
    return None


def _selection(run: PromptRun, metric: str, keep: int, chosen: list[int]) -> dict[str, Any]:
    """Where the kept samples came from: source indices, metric values and (srae runs) seeds, best first."""
    values = metric_values(run, metric)
    selection = {"metric": metric, "keep": keep, "source": str(run.folder), "source_samples": len(run.samples),
                 "source_indices": chosen, "values": [values[k] for k in chosen]}
    seeds = run.metadata.get("seeds")
    if isinstance(seeds, list) and all(k < len(seeds) for k in chosen):
        selection["seeds"] = [seeds[k] for k in chosen]  # seeds[k] is sample k's seed
    return selection


def _write_selected(target: Path, run: PromptRun, chosen: list[int], meta: dict[str, Any],
                    selection: dict[str, Any]) -> None:
    """One prompt folder of the tree: the chosen samples renumbered 0..K-1, with their per-sample fields."""
    (target / "samples").mkdir(parents=True)
    by_index = {s.index: s for s in run.samples}
    for j, k in enumerate(chosen):
        shutil.copyfile(by_index[k].path, target / "samples" / f"{j:05d}.png")
    meta = {**meta, "n_samples_generated": len(chosen), "selection": selection}
    if "seeds" in selection:
        meta["seeds"] = selection["seeds"]
    responses = {str(j): by_index[k].verify for j, k in enumerate(chosen) if by_index[k].verify is not None}
    if responses:
        meta["text_responses"] = responses
    names = sorted({n for k in chosen for n in by_index[k].scores})
    if names:
        meta["scores"] = {n: [by_index[k].scores.get(n) for k in chosen] for n in names}
    (target / "metadata.jsonl").write_text(finite_json(meta, str(target / "metadata.jsonl")) + "\n")
