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
naming; ``srae verify`` reads it). Resume: metadata is written after every sample, so a re-run skips a
prompt whose samples are all scored and continues a partial one at the first unscored sample, keeping the
numbering and every earlier score. Under torchrun each process takes prompts ``rank::world_size``; seeds
depend only on (seed, k), so results do not depend on the process count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.data.images import read_image
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.events import Reporter
from scale_rae_core.infer.outputs import atomic_write, write_png
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.prompts import CAPTION_QUESTION, GENERATION_REQUEST, VERIFY_QUESTION
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

    @property
    def total(self) -> int:
        return self.n * self.rounds


# ----------------------------------------------------------------------------------------------- prompts
def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Prompt lines ``{"index", "prompt", ...}`` from a reference JSONL ({"index"?, "prompt"}), a GenEval
    metadata JSONL ({"prompt", "tag", "include", ...}) or plain text (one prompt per line). Without an
    "index" a line's index is its position among the non-empty lines."""
    if not path.is_file():
        raise DataError(f"--prompts {path}: not found; pass a JSONL with \"prompt\" or a text file (one per line)")
    lines = [(n, s) for n, s in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if s.strip()]
    if not lines:
        raise DataError(f"--prompts {path}: empty")
    is_jsonl = lines[0][1].lstrip().startswith("{")
    out: list[dict[str, Any]] = []
    for position, (number, text) in enumerate(lines):
        if is_jsonl:
            try:
                item = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"--prompts {path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
                raise DataError(f"--prompts {path}:{number}: needs a non-empty \"prompt\" string")
            index = item.get("index", position)
            if not isinstance(index, int) or index < 0:
                raise DataError(f"--prompts {path}:{number}: \"index\" must be a non-negative integer")
            out.append({**item, "index": index})
        else:
            out.append({"index": position, "prompt": text.strip()})
    seen: set[int] = set()
    for item in out:
        if item["index"] in seen:
            raise DataError(f"--prompts {path}: index {item['index']} appears twice")
        seen.add(item["index"])
    return out


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
def _check_same_run(folder: Path, meta: dict[str, Any], model: str, settings: ScaleSettings, sampler: SamplerSettings,
                    decoder_id: str) -> None:
    """A prompt folder is continued only with the settings its samples were made with (else mixed samples)."""
    made = {**meta.get("srae", {}), "model": meta.get("model_path"), "seed": (meta.get("seeds") or [None])[0]}
    now = {"model": model, "seed": settings.seed, "verify_on": settings.verify_on, "decoder": decoder_id,
           "request": GENERATION_REQUEST, **sampler.describe()}
    for key, value in now.items():
        if made.get(key) is not None and made[key] != value:
            flag = key if key == "request" else "--" + key.replace("_", "-")
            raise ConfigError(
                f"{folder / 'metadata.jsonl'}: its samples were made with {flag} {made[key]}, this run asks for {value}; "
                f"pass another --out or delete {folder.parent} to start over"
            )


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
    text = json.dumps(meta) + "\n"
    atomic_write(folder / "metadata.jsonl", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run_scaling(
    session: Session, prompts: list[dict[str, Any]], out: Path, model: str, settings: ScaleSettings,
    sampler: SamplerSettings, scorers: list[Scorer], reporter: Reporter | None = None,
    rank: int | None = None, world_size: int | None = None,
) -> Path:
    """Run the loop for this process's share of ``prompts``; return the run root."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    root = run_root(out, model, settings)
    mine = prompts[rank::world_size]
    reporter = reporter or Reporter()
    decoder_id = session.decoder()[1].describe()["id"]  # fail before any compute when no decoder can be found
    yes_no = V.yes_no_ids(session.tokenizer)
    names = [s.name for s in scorers]
    with reporter.task(f"scale (rank {rank}/{world_size})" if world_size > 1 else "scale",
                       total=len(mine) * settings.total) as advance:
        for line in mine:
            folder = root / f"{line['index']:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            meta_path = folder / "metadata.jsonl"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            done = _done(folder, meta, names) if meta else 0
            if done:
                _check_same_run(folder, meta, model, settings, sampler, decoder_id)
            advance(min(done, settings.total))
            if done < settings.total:
                _scale_prompt(session, line, folder, meta, done, model, settings, sampler, scorers, decoder_id, yes_no,
                              advance)
    return root


def _scale_prompt(
    session: Session, line: dict[str, Any], folder: Path, meta: dict[str, Any], done: int, model: str,
    settings: ScaleSettings, sampler: SamplerSettings, scorers: list[Scorer], decoder_id: str,
    yes_no: tuple[frozenset[int], frozenset[int]], advance: Any,
) -> None:
    """Samples ``done`` .. ``settings.total - 1`` of one prompt: draw, write, self-verify, score, record each."""
    from scale_rae_core.infer.generate import decode_to_image_start

    request = GENERATION_REQUEST.format(prompt=line["prompt"])
    texts, conditions = decode_to_image_start(session, [request], settings.max_new_tokens)
    text = texts[0]
    names = [s.name for s in scorers]
    meta = {
        **{k: v for k, v in line.items()},
        "model_path": model, "guidance_level": sampler.guidance, "max_new_tokens": settings.max_new_tokens,
        "n_samples_generated": done, "input_prompt": text.request,
        "text_responses": {k: v for k, v in meta.get("text_responses", {}).items() if int(k) < done},
        "scores": {n: meta.get("scores", {}).get(n, [])[:done] for n in names},
        "seeds": [settings.seed + k for k in range(done)],
        "srae": {"n": settings.n, "rounds": settings.rounds, "verify_on": settings.verify_on,
                 "request": GENERATION_REQUEST, "decoder": decoder_id, **sampler.describe()},
    }
    request_ids = _request_ids(session, request)
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
            record = self_verify(session, line["prompt"], features, request_ids, text.generated_ids,
                                 yes_no, settings.verify_max_new_tokens)
            record["gen_output_text"] = text.text
            for scorer in scorers:
                meta["scores"][scorer.name].append(score_batch(scorer, [line["prompt"]], [image])[0])
            meta["text_responses"][str(k)] = record
            meta["seeds"].append(seeds[j])
            meta["n_samples_generated"] = k + 1
            _write_metadata(folder, meta)
            advance(1)


def _request_ids(session: Session, request: str) -> list[int]:
    from scale_rae_core.models.llm import build_sample

    lm = session.model.lm
    return build_sample([{"from": "human", "value": request}], session.tokenizer, lm.cfg.num_image_tokens,
                        int(lm.llm.config.max_position_embeddings), add_generation_prompt=True).input_ids
