"""The test-time scaling loop: n × rounds samples per prompt, each scored by scorers and by self-verification.

For each prompt (index i, text p) and each sample k < n·rounds:

1. the generation request ``GENERATION_REQUEST`` ("Generate an image of {p}") is decoded greedily once per prompt (text until
   ``<im_start>``, deterministic), then the flow head samples latent k from seed ``seed + k`` and the
   pixel decoder writes ``{root}/{i:05d}/samples/{k:05d}.png``;
2. self-verification (``scale_rae_core.scale.verify``) on the latent (``verify_on="latent"``, the
   reference's mode) or on the written PNG, read and re-encoded as ``understand`` reads an image (``"image"``):
   the yes/no answer to ``VERIFY_QUESTION`` (decoded as ``understand`` decodes) with its logits and
   confidences, the teacher-forced caption loss of p after ``CAPTION_QUESTION``, and the self-certainty over
   the image positions;
3. every scorer (``scale_rae_core.scale.scorers``: ``image_reward``, ``shapes``, user scorers) scores the PNG;
4. ``metadata.jsonl`` is rewritten atomically in the reference layout (input line fields, ``text_responses``
   {"<k>": ...}, ``all_ir_scores`` / ``top_ir_*`` when ImageReward runs) plus ``scores`` {scorer: [n]}
   and ``seeds``.

Layout: ``{out}/{model basename, '.'→'-'}/{rounds}_verify_scale_{verify_on}/{index:05d}/`` (the reference's
naming; ``srae verify`` reads it). The run root is locked for the whole command (:mod:`scale_rae_core.runlock`,
by the main process under torchrun), so a second ``srae scale`` or a ``srae verify`` of it is refused meanwhile.

A prompt whose request or verification questions do not fit the model (``SequenceTooLongError``) fails alone:
its metadata gets ``"srae_failed": reason`` and the run goes on (``srae verify`` writes it as a failed prompt).
``--scorer none`` runs no scorer at all: self-verification still scores every sample.

Resume: metadata is written after every sample, so a re-run skips a prompt whose samples are all scored and
continues a partial one at the first unscored sample, keeping the numbering and every earlier score. It
continues only with what the earlier samples were made with (:func:`fingerprint`: the model's and decoder's
names and weight revisions, the request, seed, token limits, precision and every sampler setting); a difference is
refused in one line listing it, unless ``accept_changes`` (recorded under ``srae_changes``). Under torchrun each
process takes prompts ``rank::world_size``; seeds depend only on (seed, k), so results do not depend on the
process count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scale_rae_core import fingerprint as fp
from scale_rae_core.data.images import read_image
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.events import Reporter
from scale_rae_core.files import finite_json, output_folder
from scale_rae_core.infer.layouts import FAILED, read_prompt_lines
from scale_rae_core.infer.outputs import atomic_write, check_seeds, write_png
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.models.llm import SequenceTooLongError
from scale_rae_core.prompts import CAPTION_QUESTION, GENERATION_REQUEST, VERIFY_QUESTION
from scale_rae_core.runlock import hold_on_main
from scale_rae_core.scale import verify as V
from scale_rae_core.scale.scorers import Scorer, score_batch

VERIFY_ON = ("latent", "image")


@dataclass(frozen=True)
class ScaleSettings:
    n: int = 4
    rounds: int = 1
    verify_on: str = "latent"
    seed: int = 42
    batch_size: int = 4
    max_new_tokens: int = 64
    verify_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.n < 1 or self.rounds < 1 or self.batch_size < 1:
            raise ConfigError(f"--n {self.n}, --rounds {self.rounds} and --batch-size {self.batch_size} must be >= 1")
        if self.verify_on not in VERIFY_ON:
            raise ConfigError(f"--verify-on {self.verify_on!r} is unknown; use latent or image")
        if self.max_new_tokens < 0 or self.verify_max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be >= 0 and --verify-max-new-tokens "
                              f"{self.verify_max_new_tokens} >= 1")
        check_seeds(self.seed, self.total)

    @property
    def total(self) -> int:
        return self.n * self.rounds


# ----------------------------------------------------------------------------------------------- prompts
NO_SCORER = "none"


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """``--prompts``: a reference JSONL ({"index"?, "prompt"}), a GenEval metadata JSONL ({"prompt", "tag",
    "include", ...}), DPG-Bench's prompts folder ({item_id}.txt) or plain text (one prompt per line); see
    :func:`scale_rae_core.infer.layouts.read_prompt_lines`."""
    return read_prompt_lines(path, "--prompts")


def scorer_names(requested: list[str] | None) -> list[str]:
    """``--scorer`` values -> the scorers to build: ``image_reward`` when none is given, no scorer at all for
    ``none`` (self-verification still runs: selecting by the model's own answers needs no external judge)."""
    names = list(requested or ["image_reward"])
    if NO_SCORER in names:
        if len(names) > 1:
            raise ConfigError(f"--scorer none means no scorer at all; drop it or the others ({', '.join(n for n in names if n != NO_SCORER)})")
        return []
    return names


def failed_prompts(root: Path, prompts: list[dict[str, Any]]) -> dict[str, str]:
    """{prompt folder: reason} for the prompts of ``prompts`` whose generation failed (``srae_failed``)."""
    failed = {}
    for line in prompts:
        meta = _read_metadata(root / f"{line['index']:05d}")
        if meta.get(FAILED):
            failed[f"{line['index']:05d}"] = str(meta[FAILED])
    return failed


def run_root(out: Path, model: str, settings: ScaleSettings) -> Path:
    name = model.rstrip("/").split("@")[0].split("/")[-1].replace(".", "-")
    return Path(out) / name / f"{settings.rounds}_verify_scale_{settings.verify_on}"


# ----------------------------------------------------------------------------------------------- verification
def _logits(session: Session, ids: list[int], image_start: int | None, features: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced logits (L, V) of one sequence; ``features`` (N, C) fill the N positions from ``image_start``."""
    lm, device = session.model.lm, session.runtime.device
    input_ids = torch.tensor([ids], device=device)
    with torch.inference_mode(), session.runtime.autocast():
        if features is None:
            embeds = lm.embed_text(input_ids)
        else:
            N = features.shape[0]
            positions = torch.arange(image_start, image_start + N, device=device)[None, None]  # (1, 1, N)
            no = torch.zeros(1, 1, dtype=torch.bool, device=device)
            embeds = lm.embed(input_ids, features[None, None].to(device), positions, no, ~no)
        hidden = lm.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return lm.llm.lm_head(hidden)[0].float()  # (L, V)


def self_verify(
    session: Session, prompt: str, features: torch.Tensor, request_ids: list[int], generated_ids: list[int],
    yes_no: tuple[frozenset[int], frozenset[int]], max_new_tokens: int,
) -> dict[str, Any]:
    """The reference's three verification passes for one image given as encoder tokens ``features`` (N, C)."""
    from scale_rae_core.infer.understand import _request, answer
    from scale_rae_core.models.llm import IMAGE_PLACEHOLDER_ID, build_sample, image_token_ids

    tok, lm = session.tokenizer, session.model.lm
    N, max_len = lm.cfg.num_image_tokens, int(lm.llm.config.max_position_embeddings)
    # (a) yes/no answer; the step logits come from one teacher-forced pass over the greedy answer
    question = VERIFY_QUESTION.format(prompt=prompt)
    conversation = _request(question, 1)
    (reply,) = answer(session, [conversation], [features[None]], max_new_tokens)
    ids = reply.ids
    asked = build_sample(conversation, tok, N, max_len, add_generation_prompt=True)
    logits = _logits(session, asked.input_ids + ids, asked.image_starts[0], features)
    start = len(asked.input_ids) - 1
    scores = V.answer_scores(ids, logits[start:start + len(ids)], *yes_no)
    # (b) caption likelihood of the prompt after "Describe this image."
    caption = build_sample(_request(CAPTION_QUESTION, 1), tok, N, max_len, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    logits = _logits(session, caption.input_ids + prompt_ids, caption.image_starts[0], features)
    loss, prompt_conf = V.prompt_scores(logits[len(caption.input_ids):], prompt_ids)
    # (c) self-certainty at the image positions after the generation request and its text
    image_start = len(request_ids) + len(generated_ids)  # generated_ids end with <im_start>
    seq = request_ids + generated_ids + [IMAGE_PLACEHOLDER_ID] * N + [image_token_ids(tok).im_end]
    logits = _logits(session, seq, image_start, features)
    return V.judge_record(
        scores, prompt_loss=loss, prompt_conf_score=prompt_conf,
        image_conf_score=V.image_conf(logits[image_start:image_start + N]),
        question=question, response=tok.decode(ids, skip_special_tokens=True).strip(),
        gen_output_text="",
    )


# ----------------------------------------------------------------------------------------------- loop
def fingerprint(session: Session, model: str, settings: ScaleSettings, sampler: SamplerSettings) -> dict[str, Any]:
    """Everything that changes a sample or its verification, as recorded under ``srae`` in each metadata.jsonl:
    the weights by name and revision (a hub commit, or a content hash of a local folder), the request, the
    seed, the token limits, the precision and the sampler settings."""
    decoder = session.decoder()[1].describe()
    return {"model": model, "model_revision": session.loaded.source.revision, "decoder": decoder["id"],
            "decoder_revision": decoder["revision"], "request": GENERATION_REQUEST, "seed": settings.seed,
            "verify_on": settings.verify_on, "max_new_tokens": settings.max_new_tokens,
            "verify_max_new_tokens": settings.verify_max_new_tokens, "dtype": session.runtime.dtype,
            **sampler.describe()}


def _recorded(meta: dict[str, Any]) -> dict[str, Any]:
    """What a prompt folder's samples were made with (older runs recorded some of it outside ``srae``)."""
    legacy = {"model": meta.get("model_path"), "seed": (meta.get("seeds") or [None])[0],
              "max_new_tokens": meta.get("max_new_tokens")}
    return {k: v for k, v in {**legacy, **meta.get("srae", {})}.items() if k not in ("n", "rounds")}


def _check_same_run(folder: Path, meta: dict[str, Any], now: dict[str, Any], accept: bool) -> dict[str, list[Any]]:
    """A prompt folder is continued only with the settings its samples were made with (else mixed samples);
    with ``accept``, the differences are returned (and recorded by the caller)."""
    diffs = fp.check_unchanged(
        fp.flatten(_recorded(meta)), fp.flatten(now), made=f"{folder / 'metadata.jsonl'}: its samples were made",
        accept=accept, fix=f"rerun with the same settings, pass another --out, or delete {folder.parent} to start over",
    )
    return {k: [a, b] for k, a, b in diffs}


def _done(folder: Path, meta: dict[str, Any], scorer_names: list[str]) -> int:
    """How many samples 0..k-1 are complete: PNG on disk, verification and every scorer recorded."""
    responses, scores = meta.get("text_responses", {}), meta.get("scores", {})
    k = 0
    while ((folder / "samples" / f"{k:05d}.png").is_file() and str(k) in responses
           and all(len(scores.get(name, [])) > k for name in scorer_names)):
        k += 1
    return k


def _write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    if "image_reward" in meta["scores"]:
        ir = meta["scores"]["image_reward"]
        order = sorted(range(len(ir)), key=lambda k: (-ir[k], k))
        meta["all_ir_scores"], meta["top_ir_indices"] = ir, order
        meta["top_ir_scores"] = [ir[k] for k in order]
    text = finite_json(meta, str(folder / "metadata.jsonl")) + "\n"
    atomic_write(folder / "metadata.jsonl", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run_scaling(
    session: Session, prompts: list[dict[str, Any]], out: Path, model: str, settings: ScaleSettings,
    sampler: SamplerSettings, scorers: list[Scorer], reporter: Reporter | None = None,
    rank: int | None = None, world_size: int | None = None, accept_changes: bool = False,
) -> Path:
    """Run the loop for this process's share of ``prompts``; return the run root (locked meanwhile).

    ``accept_changes``: continue prompt folders whose samples were made with other settings (see the module
    docstring) instead of refusing."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    root = run_root(out, model, settings)
    now = fingerprint(session, model, settings, sampler)  # fails before any compute when no decoder can be found
    if rank == 0:
        output_folder(root, "--out")
    with hold_on_main(root, session.backend, flag="--out"):  # no backend (tests, benchmarks): one process
        _scale_prompts(session, prompts[rank::world_size], root, settings, sampler, scorers, reporter or Reporter(),
                       now, accept_changes, f"scale (rank {rank}/{world_size})" if world_size > 1 else "scale")
    return root


def _scale_prompts(session: Session, mine: list[dict[str, Any]], root: Path, settings: ScaleSettings,
                   sampler: SamplerSettings, scorers: list[Scorer], reporter: Reporter, now: dict[str, Any],
                   accept_changes: bool, label: str) -> None:
    yes_no = V.yes_no_ids(session.tokenizer)
    names = [s.name for s in scorers]
    with reporter.task(label, total=len(mine) * settings.total) as advance:
        for line in mine:
            folder = root / f"{line['index']:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            meta = _read_metadata(folder)
            done = _done(folder, meta, names) if meta else 0
            changes = _check_same_run(folder, meta, now, accept_changes) if done else {}
            advance(min(done, settings.total))
            if done >= settings.total:
                continue
            meta = _fresh_metadata(line, meta, done, now, settings, names, changes)
            _write_metadata(folder, meta)  # the prompt's line is on disk before its first sample
            try:
                _scale_prompt(session, folder, line, meta, done, settings, sampler, scorers, yes_no, advance)
            except SequenceTooLongError as exc:  # this prompt cannot be asked or verified: it fails alone
                meta[FAILED] = str(exc)
                _write_metadata(folder, meta)
                reporter.event("scale.prompt_failed", index=line["index"], reason=str(exc))
                advance(settings.total - meta["n_samples_generated"])


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not one JSON object ({type(exc).__name__}); delete {folder} to redo this prompt") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not one JSON object; delete {folder} to redo this prompt")
    return meta


def _fresh_metadata(line: dict[str, Any], meta: dict[str, Any], done: int, now: dict[str, Any],
                    settings: ScaleSettings, names: list[str], changes: dict[str, list[Any]]) -> dict[str, Any]:
    """The prompt's metadata at the start of this run: the first ``done`` samples' records kept."""
    history = list(meta.get("srae_changes", []))
    if changes:
        history.append({"from_sample": done, "changes": changes})  # accepted: which samples were made how
    return {
        **line,
        "model_path": now["model"], "guidance_level": now["guidance"], "max_new_tokens": settings.max_new_tokens,
        "n_samples_generated": done,
        "text_responses": {k: v for k, v in meta.get("text_responses", {}).items() if int(k) < done},
        "scores": {n: meta.get("scores", {}).get(n, [])[:done] for n in names},
        "seeds": [settings.seed + k for k in range(done)],
        "srae": {"n": settings.n, "rounds": settings.rounds, **now},
        **({"srae_changes": history} if history else {}),
    }


def _scale_prompt(session: Session, folder: Path, line: dict[str, Any], meta: dict[str, Any], done: int,
                  settings: ScaleSettings, sampler: SamplerSettings, scorers: list[Scorer],
                  yes_no: tuple[frozenset[int], frozenset[int]], advance: Any) -> None:
    """Samples ``done`` .. ``total - 1`` of one prompt: sample, write, verify, score, rewrite the metadata."""
    from scale_rae_core.infer.generate import decode_to_image_start, request_ids

    request = GENERATION_REQUEST.format(prompt=line["prompt"])
    texts, conditions = decode_to_image_start(session, [request], settings.max_new_tokens)
    text = texts[0]
    meta["input_prompt"] = text.request
    asked = request_ids(session, request)
    for k0 in range(done, settings.total, settings.batch_size):
        ks = list(range(k0, min(k0 + settings.batch_size, settings.total)))
        seeds = [settings.seed + k for k in ks]
        tokens = session.sample(conditions.expand(len(ks), -1, -1), seeds, sampler)  # (b, N, C) CPU
        pixels = session.decode_pixels(tokens)  # (b, 3, H, W) in [0, 1]
        for j, k in enumerate(ks):
            png = write_png(folder / "samples" / f"{k:05d}.png", pixels[j])
            image = read_image(png)  # what the scorers, and verify_on="image", see: the PNG
            if settings.verify_on == "latent":
                features = tokens[j]
            else:
                features = session.encode_image(session.encoder_pixels([image]))[0].cpu()
            record = self_verify(session, line["prompt"], features, asked, text.generated_ids,
                                 yes_no, settings.verify_max_new_tokens)
            record["gen_output_text"] = text.text
            for scorer in scorers:
                meta["scores"][scorer.name].append(score_batch(scorer, [line["prompt"]], [image])[0])
            meta["text_responses"][str(k)] = record
            meta["seeds"].append(seeds[j])
            meta["n_samples_generated"] = k + 1
            _write_metadata(folder, meta)
            advance(1)
