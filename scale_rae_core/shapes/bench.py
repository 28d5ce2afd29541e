"""The shapes benchmark (`srae eval shapes`): how well a Scale-RAE model generates and reads the shapes world.

Three numbers, all judged without any learned judge:

1. **generation**: a fixed prompt set (every colour x shape x position of the world, 36 captions such as
   "a red circle on the left", ordered so that a prefix of 12 already holds every colour x shape). For each prompt the scaling loop
   (``scale.run.run_scaling``) draws ``k`` samples (seeds ``seed .. seed + k - 1``) and self-verifies each;
   every PNG is read by the pixel scorer (``shapes.scorer.match``): colour, shape, position and ``full``
   (all three right). Reported: the rate of the *first* sample (one sample per prompt, what
   ``srae generate`` gives) and the mean over all ``k`` samples (the same expectation, less noisy);
2. **scale + verify gain**: the rate of the sample the model itself ranks best, against a single sample's
   rate (the mean over all ``k``, the expectation of picking one at random), in full match (``gain``) and in
   colour+shape (``gain_colour_shape``); plus the oracle best-of-k (some sample is fully right), the ceiling of
   any selector. The default ranking is ``loss`` on the decoded image (``verify_on="image"``): the model's
   caption loss of the prompt given the picture it drew, re-encoded. The reference's yes/no answer on the
   latent (``--select answer_conf --verify-on latent``) ranks by noise on the tiny models (BENCHMARKS.md, "Why
   self-verification's gain is fragile");
3. **understanding**: ``n_images`` freshly rendered images (their own random stream, so never in a
   training split), each asked the world's four questions (``shapes.synth.questions``); an answer counts when
   its normalised text (lower case, outer punctuation stripped, spelling variants such as "centre"
   mapped) equals the expected word.

Each figure has a 95% interval next to it, ``<figure>_ci95: [lo, hi]`` (``eval.intervals``): the mean over ``k``
pools the correlated samples of each prompt, so its interval is a prompt-level (cluster) bootstrap, and so is
the gain's (the paired per-prompt difference best-of-k minus the mean over ``k``); figures with one trial per
prompt or per question (first sample, best-of-k, oracle, understanding) get the Wilson score interval.
``generation.confusion`` counts, per attribute, which value the reader saw in every sample for each value asked.

Samples are written under ``work/`` in the scaling loop's layout (``srae verify`` reads it); a re-run with
the same settings resumes there, other settings start it over.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from scale_rae_core.data.images import read_image
from scale_rae_core.errors import ConfigError
from scale_rae_core.eval.intervals import cluster_bootstrap, wilson
from scale_rae_core.events import Reporter
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.infer.understand import _request, answer
from scale_rae_core.prompts import SHAPES_QUESTIONS, SHAPES_WHERE
from scale_rae_core.scale.run import ScaleSettings, run_root, run_scaling
from scale_rae_core.scale.select import SELF_VERIFICATION_METRICS, read_run, select
from scale_rae_core.shapes.scorer import ShapesScorer, match, parse_prompt
from scale_rae_core.shapes.synth import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    questions,
    random_spec,
    render,
)

ATTRIBUTES = ("colour", "shape", "position")
RATES = (*ATTRIBUTES, "colour_shape", "full")
NOTHING_SEEN = "none"  # the confusion's column for samples in which the reader saw no shape
SELECTOR = "loss"  # the default ranking: the prompt's caption loss given the sample (the model's own reading)
VERIFY_ON = "image"  # ... of the decoded picture re-encoded, not of the head's latent (which echoes the prompt)
SETTINGS_FILE = "bench.json"


def bench_prompts(n: int | None = None) -> list[str]:
    """The fixed prompt set: every colour x shape x position as "a {colour} {shape} {where}".

    Ordered so that each block of 12 holds every colour x shape pair once, with each position 4 times: prompt
    i has colour i mod 4, shape i mod 3 and position (i // 4 + i // 12) mod 3 (a bijection onto the 36).
    """
    colours, positions = list(COLOURS), list(POSITIONS)
    prompts = [f"a {colours[i % 4]} {SHAPES[i % 3]} {SHAPES_WHERE[positions[(i // 4 + i // 12) % 3]]}" for i in range(36)]
    if n is not None and not 1 <= n <= len(prompts):
        raise ConfigError(f"--n-prompts {n}: choose 1..{len(prompts)} (the fixed set has {len(prompts)} prompts)")
    return prompts[:n] if n is not None else prompts


def heldout_specs(n: int, seed: int = 0) -> list[ShapeSpec]:
    """``n`` jittered specs cycling through the 72 colour x shape x position x size combinations (own stream)."""
    if n < 1:
        raise ConfigError(f"--n-images {n}: must be at least 1")
    rng = random.Random(f"srae-shapes-bench/{seed}/images")
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS, SIZES))
    specs: list[ShapeSpec] = []
    while len(specs) < n:
        order = combos[:]
        rng.shuffle(order)
        specs += [random_spec(rng, *c) for c in order[: n - len(specs)]]
    return specs


_VARIANTS = {"centre": "center", "middle": "center", "colour": "color", "big": "large", "tiny": "small"}


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation stripped, a few spelling variants mapped."""
    words = re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:'\"").split(" ")
    return " ".join(_VARIANTS.get(w, w) for w in words)


def _rate(rows: list[dict[str, bool]], key: str) -> float:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else 0.0


def _rates(rows: list[dict[str, bool]]) -> dict[str, float]:
    return {key: _rate(rows, key) for key in RATES}


def _wilson_cis(rows: list[dict[str, bool]]) -> dict[str, list[float]]:
    """The Wilson interval of each rate over ``rows``, one independent trial each (one per prompt)."""
    return {key: list(wilson(sum(bool(r[key]) for r in rows), len(rows))) for key in RATES}


def _cluster_cis(per_prompt: list[list[dict[str, bool]]]) -> dict[str, list[float]]:
    """The prompt-level bootstrap interval of each rate pooled over every prompt's samples."""
    return {key: list(cluster_bootstrap([[float(bool(s[key])) for s in samples] for samples in per_prompt]))
            for key in RATES}


def confusion(rows: list[tuple[dict[str, str | None], dict[str, str | None]]]) -> dict[str, dict[str, dict[str, int]]]:
    """Per attribute, how often the reader saw each value when each value was asked: ``{"colour": {asked: {seen:
    n}}, ...}`` from ``(asked, seen)`` attribute dicts, one pair per sample. Rows are the values asked (in the
    world's order), columns every value of the world then ``"none"`` (no shape seen); zeros included."""
    world = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}
    counts = {a: {v: dict.fromkeys([*world[a], NOTHING_SEEN], 0) for v in world[a]
                  if any(asked[a] == v for asked, _ in rows)} for a in ATTRIBUTES}
    for asked, seen in rows:
        for a in ATTRIBUTES:
            if asked[a] is not None:
                counts[a][asked[a]][seen[a] or NOTHING_SEEN] += 1
    return counts


def _judge(prompt: str, png: Path) -> dict[str, Any]:
    m = match(prompt, read_image(png))
    r = m["reading"]
    return {
        **{key: bool(m[key]) for key in (*ATTRIBUTES, "colour_shape", "full")},
        "read": {"colour": r.colour, "shape": r.shape, "position": r.position},
    }


def evaluate_generation(
    session: Session, prompts: list[str], work: Path, *, k: int, seed: int, sampler: SamplerSettings,
    max_new_tokens: int = 8, verify_max_new_tokens: int = 4, verify_on: str = VERIFY_ON, selector: str = SELECTOR,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Generation match rates (first, mean over k, best-of-k by self-verification, oracle) over ``prompts``."""
    if k < 1:
        raise ConfigError(f"--k {k}: must be at least 1")
    settings = ScaleSettings(n=k, rounds=1, seed=seed, batch_size=min(k, 8), max_new_tokens=max_new_tokens,
                             verify_max_new_tokens=verify_max_new_tokens, verify_on=verify_on)
    lines = [{"index": i, "prompt": p} for i, p in enumerate(prompts)]
    run_scaling(session, lines, work, "bench", settings, sampler, [ShapesScorer()], reporter,
                rank=0, world_size=1)
    runs, skipped = read_run(run_root(work, "bench", settings))
    if skipped:
        raise ConfigError(f"{work}: unreadable prompt folders after generation ({skipped[0]['reason']}); delete it and re-run")
    per_prompt = []
    for run in runs:
        prompt = run.metadata["prompt"]
        judged = {s.index: _judge(prompt, s.path) for s in run.samples}
        per_prompt.append({
            "prompt": prompt, "folder": str(run.folder),
            "samples": [{"index": i, "png": str(run.folder / "samples" / f"{i:05d}.png"), **j} for i, j in sorted(judged.items())],
            "selected": select(run, selector, 1)[0],
            "answers": [(run.metadata.get("text_responses") or {}).get(str(i), {}).get("answer") for i in sorted(judged)],
        })
    return {
        "n_prompts": len(runs), "k": k, "seed": seed, "selector": selector, "verify_on": verify_on, **sampler.describe(),
        **generation_figures(per_prompt), "prompts": per_prompt,
    }


def generation_figures(per_prompt: list[dict[str, Any]]) -> dict[str, Any]:
    """The generation figures, their 95% intervals and the confusion from the judged samples of each prompt
    (``{"prompt", "samples": [{"index", <RATES>: bool, "read": {attribute: value or None}}], "selected"}``)."""
    first, everything, chosen, by_prompt, seen = [], [], [], [], []
    differences: dict[str, list[list[float]]] = {"full": [], "colour_shape": []}
    for row in per_prompt:
        samples = {s["index"]: s for s in row["samples"]}
        best = samples[row["selected"]]
        first.append(samples[0])
        everything += samples.values()
        chosen.append(best)
        by_prompt.append(list(samples.values()))
        for key, paired in differences.items():  # paired, per prompt
            paired.append([float(best[key]) - _rate(list(samples.values()), key)])
        asked = parse_prompt(row["prompt"])
        seen += [(asked, s["read"]) for s in samples.values()]
    oracle = sum(any(s["full"] for s in samples) for samples in by_prompt)
    first_rates, best_rates, mean_rates = _rates(first), _rates(chosen), _rates(everything)
    return {
        "first": first_rates, "first_ci95": _wilson_cis(first),
        "mean_over_k": mean_rates, "mean_over_k_ci95": _cluster_cis(by_prompt),
        "best_of_k": best_rates, "best_of_k_ci95": _wilson_cis(chosen),
        "oracle_best_of_k": oracle / len(by_prompt) if by_prompt else 0.0,
        "oracle_best_of_k_ci95": list(wilson(oracle, len(by_prompt))),
        "gain": best_rates["full"] - mean_rates["full"], "gain_ci95": list(cluster_bootstrap(differences["full"])),
        "gain_colour_shape": best_rates["colour_shape"] - mean_rates["colour_shape"],
        "gain_colour_shape_ci95": list(cluster_bootstrap(differences["colour_shape"])),
        "confusion": confusion(seen),
    }


def evaluate_understanding(session: Session, specs: list[ShapeSpec], *, image_size: int, max_new_tokens: int = 4,
                           images_dir: Path | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Exact-match accuracy of the model's answers to the world's four questions about each of ``specs``."""
    reporter = reporter or Reporter()
    rows, by_attribute = [], {}
    attribute_of = dict(SHAPES_QUESTIONS)  # question -> attribute
    with reporter.task("understand", len(specs)) as advance:
        for i, spec in enumerate(specs):
            image = render(spec, image_size)
            png = None
            if images_dir is not None:
                images_dir.mkdir(parents=True, exist_ok=True)
                png = images_dir / f"{i:05d}.png"
                image.save(png)
            features = session.encode_image(session.encoder_pixels([image]))  # (1, N, C), as understand reads it
            qa = []
            for question, expected in questions(spec):
                (reply,) = answer(session, [_request(question, 1)], [features], max_new_tokens)
                text = session.tokenizer.decode(reply.ids, skip_special_tokens=True).strip()
                ok = normalise_answer(text) == expected
                attr = attribute_of[question]
                by_attribute.setdefault(attr, []).append(ok)
                qa.append({"question": question, "expected": expected, "answer": text, "correct": ok})
            rows.append({"spec": spec.attributes(), "png": str(png) if png else None, "qa": qa})
            advance(1)
    answers = [q["correct"] for r in rows for q in r["qa"]]
    return {
        "n_images": len(specs), "n_questions": len(answers),
        "accuracy": sum(answers) / len(answers) if answers else 0.0,
        "accuracy_ci95": list(wilson(sum(answers), len(answers))),
        "by_attribute": {a: sum(v) / len(v) for a, v in by_attribute.items()},
        "by_attribute_ci95": {a: list(wilson(sum(v), len(v))) for a, v in by_attribute.items()},
        "images": rows,
    }


def run_benchmark(
    session: Session, out: Path, *, n_prompts: int | None = None, k: int = 4, n_images: int = 24, seed: int = 0,
    steps: int = 50, guidance: float = 1.0, verify_on: str = VERIFY_ON, selector: str = SELECTOR,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark; write ``out`` (JSON) and the samples under ``out``'s stem folder; return the result."""
    out = Path(out)
    if out.suffix != ".json":
        raise ConfigError(f"--out {out}: the benchmark is written as JSON; give a name ending in .json")
    work = out.with_suffix("")
    start = time.perf_counter()
    prompts = bench_prompts(n_prompts)
    specs = heldout_specs(n_images, seed)
    sampler = SamplerSettings(steps=steps, guidance=guidance)
    if selector not in SELF_VERIFICATION_METRICS:
        raise ConfigError(f"--select {selector}: choose one of {', '.join(SELF_VERIFICATION_METRICS)} (the model's own scores)")
    settings = {"prompts": prompts, "k": k, "seed": seed, "n_images": n_images, "sampler": sampler.describe(), "verify_on": verify_on,
                "model": session.loaded.source.describe()["id"], "decoder": session.decoder()[1].describe()["id"]}
    marker = work / SETTINGS_FILE
    if work.exists() and (not marker.is_file() or json.loads(marker.read_text()) != settings):
        shutil.rmtree(work)  # other settings (or a foreign folder we made earlier): start over
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1) + "\n")
    size = session.encoder().input_size
    result = {
        "benchmark": "shapes", "model": session.loaded.source.describe(), "seed": seed,
        "generation": evaluate_generation(session, prompts, work / "samples", k=k, seed=seed, sampler=sampler,
                                          verify_on=verify_on, selector=selector, reporter=reporter),
        "understanding": evaluate_understanding(session, specs, image_size=size, images_dir=work / "heldout",
                                                reporter=reporter),
    }
    result["seconds"] = round(time.perf_counter() - start, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    (reporter or Reporter()).event("eval_shapes.done", out=str(out), **summary(result))
    return result


def summary(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a benchmark result, flat."""
    g, u = result["generation"], result["understanding"]
    return {
        "gen_full_first": round(g["first"]["full"], 4), "gen_full_mean": round(g["mean_over_k"]["full"], 4),
        "gen_full_best_of_k": round(g["best_of_k"]["full"], 4), "gen_full_oracle": round(g["oracle_best_of_k"], 4),
        "gen_colour_shape_first": round(g["first"]["colour_shape"], 4),
        "gen_colour_shape_mean": round(g["mean_over_k"]["colour_shape"], 4),
        "gen_position_mean": round(g["mean_over_k"]["position"], 4),
        "gain": round(g["gain"], 4),
        **({"gain_colour_shape": round(g["gain_colour_shape"], 4)} if "gain_colour_shape" in g else {}),
        "understanding": round(u["accuracy"], 4),
    }


def about_fields(result: dict[str, Any]) -> dict[str, Any]:
    """What a model's ``ABOUT.json`` records of its benchmark: the headline numbers and the settings they need."""
    g = result["generation"]
    settings = ("n_prompts", "k", "seed", "steps", "guidance", "sampler", "selector", "verify_on")
    return {"shapes_benchmark": summary(result), "shapes_benchmark_settings": {k: g.get(k) for k in settings}}


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(row, colour, shape, position, colour+shape, full) percentages, each with its 95% interval where the result
    has one ("84.0% [76.1, 90.3]"; results written before the intervals show the figure alone); shared by the CLI
    table and report.html."""
    g, u = result["generation"], result["understanding"]
    rows = []
    for label, key in (("first sample", "first"), (f"mean over k={g['k']}", "mean_over_k"),
                       (f"best of {g['k']} by {g['selector']}", "best_of_k")):
        r, ci = g[key], g.get(f"{key}_ci95", {})
        rows.append((label, *(percent(r[a], ci.get(a)) for a in ("colour", "shape", "position", "colour_shape", "full"))))
    rows.append((f"oracle best of {g['k']}", "-", "-", "-", "-", percent(g["oracle_best_of_k"], g.get("oracle_best_of_k_ci95"))))
    by, ci = u["by_attribute"], u.get("by_attribute_ci95", {})
    rows.append((f"understanding ({u['n_questions']} questions, size {percent(by.get('size'), ci.get('size'))})",
                 *(percent(by.get(a), ci.get(a)) for a in ("colour", "shape", "position")), "-",
                 percent(u["accuracy"], u.get("accuracy_ci95"))))
    return rows


def percent(x: float | None, ci95: list[float] | None = None, *, points: bool = False) -> str:
    """``x`` as a percentage ("84.0%"), or as signed points ("+4.5 points") with ``points``, followed by its
    interval when given ("84.0% [76.1, 90.3]"); "-" for no figure."""
    if x is None:
        return "-"
    text = f"{100 * x:+.1f} points" if points else f"{100 * x:.1f}%"
    if ci95 is None:
        return text
    lo, hi = (f"{100 * v:+.1f}" if points else f"{100 * v:.1f}" for v in ci95)
    return f"{text} [{lo}, {hi}]"
