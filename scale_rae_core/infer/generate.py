"""Text to image: chat-templated request -> greedy text with a KV cache -> ``<im_start>`` -> latent queries ->
per-token conditions -> flow head -> latents -> pixel decoder -> PNG (+ manifest, + latent file).

The request is one user turn in the reference's Qwen template; the prompt text is used exactly as given (the
released models were tuned on requests such as "Can you generate a photo of a cat on a windowsill?", so phrase it
like that — nothing is prepended). Text is decoded greedily until the model writes ``<im_start>``; if it ends its
turn (``<|im_end|>``) or writes ``max_new_tokens`` tokens first, ``<im_start>`` is **forced** at that point and the
manifest says ``"image_start": "forced"`` (the reference would return without an image). ``max_new_tokens = 0``
forces it right after the prompt.

Prompts are decoded together in batches (left padding with an attention mask, positions counted from each row's
first real token, one KV cache); a row that is done waits with masked positions. All images of one prompt share
its conditions (decoding is deterministic), so the LLM runs once per prompt; the head then samples every image in
batches of ``batch_size``, CFG rows included in the same forward.

Image j (0-based) of every prompt uses seed ``seed + j``; ``--seed S --n 1`` regenerates the image whose manifest
says ``"seed": S`` (bit for bit with the same prompts per batch; with other batch neighbours up to float rounding,
at most one grey level, since other batch shapes run other CPU/GPU kernels). ``--noise reference`` instead draws
the start noise as the released CLI does (the global generator seeded with ``--seed``, one draw per image in the
order the images are made) and ``--noise-file`` reads it; the manifest's ``noise`` says which, and for those two
the image's ``noise_index`` in that order (:mod:`scale_rae_core.infer.noise`). With ``--noise reference
--sampler reference --steps 50 --guidance 1`` on CUDA an image is the released CLI's ``t2i`` image for the same
prompt and seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.errors import DataError
from scale_rae_core.events import Reporter
from scale_rae_core.files import output_folder, read_text
from scale_rae_core.infer.noise import SeedNoise, StartNoise
from scale_rae_core.infer.outputs import check_seeds, claim_stem, save_latent, write_manifest, write_png
from scale_rae_core.infer.pipeline import SamplerSettings, Session, check_guidable, seconds_since
from scale_rae_core.prompts import IMAGE_MARKER

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class TextResult:
    prompt: str
    request: str  # the templated text the LLM read
    generated_ids: list[int]  # up to and including <im_start>
    text: str  # the generated text before <im_start>, special tokens removed
    forced: bool  # <im_start> was forced (turn end or token limit)


@dataclass
class ImageRecord:
    prompt: str
    seed: int
    stem: Path
    png: Path | None
    manifest: Path
    latent: Path | None
    text: str


ImageWriter = Callable[[int, TextResult, int, int, torch.Tensor], ImageRecord]  # see generate_images


@dataclass
class GenerateResult:
    images: list[ImageRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, '#' comments; or JSONL with a "prompt" field)."""
    import json

    out = [p for p in prompts if p.strip()]
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise DataError(f"--prompts-file {prompts_file}: not found; pass a text file (one prompt per line) or a JSONL")
        for i, line in enumerate(read_text(prompts_file, "--prompts-file").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if prompts_file.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                    text = item["prompt"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"--prompts-file {prompts_file}:{i}: not a JSON object with a \"prompt\" string") from None
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"--prompts-file {prompts_file}:{i}: \"prompt\" must be a non-empty string")
                out.append(text)
            else:
                out.append(line)
    if not out:
        raise DataError("no prompt given; pass PROMPT arguments or --prompts-file FILE")
    for p in out:
        if IMAGE_MARKER in p:
            raise DataError(f"prompt {p[:40]!r} contains <image>; to ask about an image use `srae understand`")
    return out


def request_ids(session: Session, prompt: str) -> list[int]:
    """The token ids of the chat-templated request ``prompt`` (one user turn, the assistant turn opened);
    ``SequenceTooLongError`` (a DataError) in one line when it does not fit the model."""
    from scale_rae_core.models.llm import SequenceTooLongError, build_sample

    lm = session.model.lm
    N, max_len = lm.cfg.num_image_tokens, int(lm.llm.config.max_position_embeddings)
    try:
        return build_sample([{"from": "human", "value": prompt}], session.tokenizer, N, max_len,
                            add_generation_prompt=True).input_ids
    except SequenceTooLongError:
        raise SequenceTooLongError(
            f"prompt {prompt[:40]!r}…: longer than the {max_len} tokens the model reads (its "
            "max_position_embeddings, with the chat template); shorten the prompt"
        ) from None


@torch.inference_mode()
def decode_to_image_start(session: Session, prompts: list[str], max_new_tokens: int) -> tuple[list[TextResult], torch.Tensor]:
    """Greedy text for a batch of prompts until ``<im_start>`` (forced at a turn end or the token limit)
    -> (texts, conditions (B, N, Z) on the device)."""
    from scale_rae_core.models.llm import image_token_ids, stop_token_ids

    lm, tok, device = session.model.lm, session.tokenizer, session.runtime.device
    ids = [request_ids(session, p) for p in prompts]
    embeds = [lm.embed_text(torch.tensor(row, device=device)) for row in ids]  # (T_i, d) each
    out = lm.decode(embeds, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tok),
                    image_start_id=image_token_ids(tok).im_start, force_image=True)
    results = [
        TextResult(
            prompt=p,
            request=tok.decode(ids[r]),
            generated_ids=out.tokens[r],
            text=tok.decode(out.tokens[r], skip_special_tokens=True).strip(),
            forced=out.forced[r],
        )
        for r, p in enumerate(prompts)
    ]
    assert out.conditions is not None and all(out.opened)  # force_image: every row opens its image
    return results, out.conditions


def generate_images(
    session: Session,
    prompts: list[str],
    out_dir: Path,
    settings: SamplerSettings,
    *,
    seed: int = 0,
    n: int = 1,
    batch_size: int = 4,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    save_latents: bool = False,
    decode: bool = True,
    reporter: Reporter | None = None,
    writer: ImageWriter | None = None,
    noise: StartNoise | None = None,
) -> GenerateResult:
    """Generate ``n`` images for each prompt into ``out_dir`` (PNG + manifest [+ latent] per image).

    ``writer``: where each image goes instead (a benchmark layout, :mod:`scale_rae_core.infer.layouts`); it is
    called as ``writer(position of the prompt in prompts, its text, seed, image index in the prompt, pixels (3, H, W))``,
    prompt after prompt, images in order. ``noise``: where the start noise comes from (default: each image's seed;
    see the module docstring)."""
    from scale_rae_core.errors import ConfigError

    if n < 1 or batch_size < 1:
        raise ConfigError(f"--n {n} and --batch-size {batch_size} must both be >= 1")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be >= 0")
    if writer is not None and not decode:
        raise ConfigError("--skip-decoder writes no images; a --layout needs them (drop --skip-decoder)")
    if not decode and not save_latents:
        raise ConfigError("--skip-decoder without --save-latent would write no image data; add --save-latent")
    check_seeds(seed, n)
    check_guidable(session.model, settings)
    dit = session.model.diff_head.cfg
    output_folder(out_dir)
    if decode:
        session.decoder()  # fail early (before any compute) when no decoder can be found
    noise = noise or SeedNoise()
    noise.check(len(prompts) * n, (dit.in_channels, dit.grid, dit.grid))  # reference: seeds the generator here
    reporter = reporter or Reporter()
    result = GenerateResult()
    totals = {"text": 0.0, "sample": 0.0, "decode": 0.0}
    enc = session.loaded.config.encoder
    with reporter.task("generate", total=len(prompts) * n) as advance:
        for p0 in range(0, len(prompts), batch_size):
            chunk = prompts[p0:p0 + batch_size]
            start = time.perf_counter()
            texts, conditions = decode_to_image_start(session, chunk, max_new_tokens)
            text_s = seconds_since(start)
            totals["text"] += text_s
            rows = [(i, j) for i in range(len(chunk)) for j in range(n)]  # (prompt in chunk, image of prompt)
            for r0 in range(0, len(rows), batch_size):
                batch = rows[r0:r0 + batch_size]
                seeds = [seed + j for _, j in batch]
                cond = conditions[torch.tensor([i for i, _ in batch], device=conditions.device)]  # (b, N, Z)
                start = time.perf_counter()
                first = noise.next_index
                tokens = session.sample(cond, seeds, settings, noise)  # (b, N, C) on the CPU
                sample_s = seconds_since(start)
                start = time.perf_counter()
                pixels = session.decode_pixels(tokens) if decode else None
                decode_s = seconds_since(start)
                totals["sample"] += sample_s
                totals["decode"] += decode_s
                for k, (i, j) in enumerate(batch):
                    record = writer(p0 + i, texts[i], seeds[k], j, pixels[k]) if writer and pixels is not None else _write_image(
                        session, out_dir, texts[i], seeds[k], j, settings, tokens[k], None if pixels is None else pixels[k],
                        save_latents, {"text": text_s, "sample": sample_s, "decode": decode_s,
                                       "load": session.load_seconds, "batch_images": len(batch),
                                       "batch_prompts": len(chunk)}, enc,
                        {"noise": noise.kind} | ({"noise_index": first + k} if first >= 0 else {}),
                    )
                    result.images.append(record)
                    reporter.event("image", png=record.png, manifest=record.manifest, seed=record.seed)
                    advance(1)
    result.timings = {k: round(v, 4) for k, v in totals.items()} | {"load": session.load_seconds}
    return result


def _write_image(
    session: Session, out_dir: Path, text: TextResult, seed: int, index_in_prompt: int, settings: SamplerSettings,
    tokens: torch.Tensor, pixels: torch.Tensor | None, save: bool, timings: dict[str, Any], encoder: dict[str, Any],
    noise: dict[str, Any],
) -> ImageRecord:
    stem = claim_stem(out_dir, text.prompt, seed)
    png = write_png(stem.with_suffix(".png"), pixels) if pixels is not None else None
    latent = None
    model_id = session.loaded.source.describe()
    if save:
        latent = save_latent(stem.with_suffix(".safetensors"), tokens[None], {
            "encoder_kind": encoder.get("kind"), "encoder_path": encoder.get("path"), "space": "encoder",
            "prompt": text.prompt, "seed": str(seed), "model": model_id["id"], "model_revision": model_id["revision"],
            **{k: str(v) for k, v in settings.describe().items()},
        })
    manifest = session.base_manifest("generate") | {
        "prompt": text.prompt,
        "request": text.request,
        "output_text": text.text,
        "image_start": "forced" if text.forced else "model",
        "seed": seed,
        **noise,
        "index_in_prompt": index_in_prompt,
        **settings.describe(),
        "image": png.name if png else None,
        "image_size": list(pixels.shape[-2:]) if pixels is not None else None,
        "latent": latent.name if latent else None,
        "latent_shape": list(tokens.shape),
        "timings_s": timings,
    }
    write_manifest(stem.with_suffix(".json"), manifest)
    return ImageRecord(text.prompt, seed, stem, png, stem.with_suffix(".json"), latent, text.text)

