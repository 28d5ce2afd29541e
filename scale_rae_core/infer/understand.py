"""Reading images and latents: ``understand`` (image -> encoder -> projector -> answer) and ``latent
decode|qa|continue`` (a saved latent -> pixels, or -> projector -> answer), as the reference's ``img`` / ``latent``.

The request is one user turn ``<im_start><image><im_end>\\n{question}`` (the reference's prompt; ``<image>`` in the
question places the image elsewhere), where the N image positions hold ``mm_projector(encoder tokens)``. The answer
is decoded greedily with a KV cache until ``<|im_end|>`` or ``max_new_tokens`` (several conversations can be answered
together: :func:`answer` decodes them as one batch). The image file is read by ``data.images`` (EXIF orientation,
transparency over white, 16-bit and float images scaled) and squashed to the encoder's input size by the same
antialiased bicubic resize as training (``square_pixels``). Should the model open an image
(``<im_start>``), the latent queries are fed and the image is sampled and written like ``generate`` does.

``latent qa`` and ``latent continue`` differ only for our latent files, which remember their prompt: ``continue``
replays that turn (user: the original prompt; assistant: the image) and adds PROMPT as the next user turn, so the
model can answer about, or follow up on, its own image. For a reference ``.pt`` (no prompt stored) both are the
reference's single path: the latent as a context image with PROMPT.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.infer.outputs import (
    LatentFile,
    claim_stem,
    load_latent,
    save_latent,
    write_manifest,
    write_png,
)
from scale_rae_core.infer.pipeline import SamplerSettings, Session, decode_pixels, open_backend, seconds_since
from scale_rae_core.prompts import IMAGE_MARKER, with_images

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class Answer:
    text: str
    manifest: Path
    png: Path | None = None
    latent: Path | None = None


@dataclass
class Reply:
    ids: list[int]  # the greedy answer, ending with the stop id or <im_start> it ended on (if any)
    conditions: torch.Tensor | None  # (1, N, Z) if the model opened an image, else None


def _request(question: str, n_images: int, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """The conversation: optional earlier turns, then a user turn reading ``n_images`` context images.

    Without ``<image>`` markers in the question the images go first, each followed by a newline (the reference's
    ``<im_start><image><im_end>\\n{question}``); with markers, their count must be ``n_images``.
    """
    marks = question.count(IMAGE_MARKER)
    if marks == 0:
        question = with_images(question, n_images)
    elif marks != n_images:
        raise DataError(f"the question has {marks} <image> markers but {n_images} image(s) go with it; remove them or match the count")
    return [*(history or []), {"from": "human", "value": question}]


@torch.inference_mode()
def answer(
    session: Session, conversations: Sequence[list[dict[str, str]]], features: Sequence[torch.Tensor], max_new_tokens: int
) -> list[Reply]:
    """Greedy answers to a batch of ``conversations``, decoded together; ``features[i]`` (n_i, N, C) are the
    images of conversation i, all read as context images (projector). An answer ends at ``<|im_end|>``, at
    ``max_new_tokens``, or when the model opens an image (its conditions are returned)."""
    from scale_rae_core.models.llm import build_sample, collate, image_token_ids, stop_token_ids

    lm, tok, device = session.model.lm, session.tokenizer, session.runtime.device
    N, max_len = lm.cfg.num_image_tokens, int(lm.llm.config.max_position_embeddings)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    embeds = []
    with session.runtime.autocast():
        for conversation, feats in zip(conversations, features, strict=True):
            sample = build_sample(conversation, tok, N, max_len, add_generation_prompt=True)
            n = feats.shape[0]
            if len(sample.image_starts) != n:
                raise DataError(f"the request has {len(sample.image_starts)} image(s) but {n} latent image(s) are given")
            batch = collate([sample], len(sample.input_ids), pad, max_images=n, image_features=[feats.float().cpu()])
            batch = {k: v.to(device) for k, v in batch.items()}
            embeds.append(lm.embed(
                batch["input_ids"], batch["image_features"], batch["image_positions"],
                torch.zeros_like(batch["answer_image_mask"]),  # every image is read (projector), none is generated
                batch["image_valid"],
            )[0])  # (T_i, d)
        out = lm.decode(embeds, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tok),
                        image_start_id=image_token_ids(tok).im_start)
    return [
        Reply(ids, out.conditions[r:r + 1] if out.opened[r] and out.conditions is not None else None)
        for r, ids in enumerate(out.tokens)
    ]


def answer_images(
    session: Session, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers to (image, question) pairs, decoded as one batch: the encoder reads the images together,
    each question is the reference's single-image request, the answers are text (decoding stops where the model
    would open an image)."""
    features = session.encode_image(session.encoder_pixels(images))  # (B, N, C)
    replies = answer(session, [_request(q, 1) for q in questions], [f[None] for f in features], max_new_tokens)
    return [session.tokenizer.decode(r.ids, skip_special_tokens=True).strip() for r in replies]


def _finish(
    session: Session, mode: str, label: str, reply: Reply, fields: dict[str, Any],
    out_dir: Path, settings: SamplerSettings, seed: int, save_latents: bool, timings: dict[str, float],
) -> Answer:
    """Write the manifest (and the image the model chose to make, if any)."""
    text = session.tokenizer.decode(reply.ids, skip_special_tokens=True).strip()
    conditions = reply.conditions
    stem = claim_stem(out_dir, label, seed if conditions is not None else None)
    png = latent = None
    extra: dict[str, Any] = {}
    if conditions is not None:
        start = time.perf_counter()
        tokens = session.sample(conditions, [seed], settings)  # (1, N, C)
        timings["sample"] = seconds_since(start)
        extra = {"seed": seed, **settings.describe()}
        if save_latents:
            enc = session.loaded.encoder
            latent = save_latent(stem.with_suffix(".safetensors"), tokens, {
                "encoder_kind": enc.kind, "encoder_path": enc.path, "space": "encoder", "prompt": label,
                "seed": str(seed), "model": session.loaded.source.describe()["id"],
            })
        try:
            start = time.perf_counter()
            png = write_png(stem.with_suffix(".png"), session.decode_pixels(tokens)[0])
            timings["decode"] = seconds_since(start)
        except ConfigError as exc:  # no decoder: keep the answer, say why there is no PNG
            extra["image_error"] = str(exc)
    manifest = session.base_manifest(mode) | fields | {"output_text": text} | extra | {
        "image": png.name if png else None,
        "latent": latent.name if latent else None,
        "timings_s": timings | {"load": session.load_seconds},
    }
    write_manifest(stem.with_suffix(".json"), manifest)
    return Answer(text, stem.with_suffix(".json"), png, latent)


def understand_image(
    session: Session, image: Path, question: str, out_dir: Path, settings: SamplerSettings, *,
    seed: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, save_latents: bool = False,
) -> Answer:
    """``srae understand IMAGE QUESTION``."""
    start = time.perf_counter()
    features = session.encode_image(image_pixels(session, image))  # (1, N, C)
    encode_s = seconds_since(start)
    start = time.perf_counter()
    (reply,) = answer(session, [_request(question, 1)], [features], max_new_tokens)
    timings = {"encode": encode_s, "text": seconds_since(start)}
    fields = {"input_image": str(image), "question": question}
    return _finish(session, "understand", question, reply, fields, out_dir, settings, seed, save_latents, timings)


def image_pixels(session: Session, path: Path) -> torch.Tensor:
    """An image file -> (1, 3, S, S) in [0, 1] for the model's encoder: the reader and the resize of training."""
    from scale_rae_core.data.images import open_image_file

    return session.encoder_pixels([open_image_file(path)])


def read_latent(session: Session, path: Path) -> LatentFile:
    lm = session.loaded.config.lm
    latent = load_latent(path, lm.num_image_tokens, lm.encoder_channels)
    kind = latent.metadata.get("encoder_kind")
    if kind and kind != session.loaded.encoder.kind:
        raise DataError(f"latent file {path} was made with a {kind} encoder but the model reads {session.loaded.encoder.kind}")
    return latent


def latent_answer(
    session: Session, path: Path, prompt: str, action: str, out_dir: Path, settings: SamplerSettings, *,
    seed: int = 0, max_new_tokens: int = 64, save_latents: bool = False,
) -> Answer:
    """``srae latent qa|continue LATENT PROMPT``."""
    if action not in ("qa", "continue"):
        raise ConfigError(f"latent action '{action}' is unknown; use decode, qa or continue")
    latent = read_latent(session, path)
    history = None
    original = latent.metadata.get("prompt")
    if action == "continue" and original:
        history = [{"from": "human", "value": original}, {"from": "gpt", "value": IMAGE_MARKER * latent.tokens.shape[0]}]
    n_new = 0 if history else latent.tokens.shape[0]  # with history the images sit in the replayed assistant turn
    start = time.perf_counter()
    (reply,) = answer(session, [_request(prompt, n_new, history)], [latent.tokens], max_new_tokens)
    fields = {"latent_path": str(path), "latent_format": "reference-pt" if latent.is_reference else "srae",
              "prompt": prompt, "history": history}
    return _finish(session, f"latent-{action}", prompt, reply, fields, out_dir, settings, seed,
                   save_latents, {"text": seconds_since(start)})


def decode_latent_file(
    path: Path, out_dir: Path, decoder_spec: str | None, profile: Any, *, dtype: str | None = None
) -> list[Path]:
    """``srae latent decode LATENT``: every image in the file -> PNG + manifest. Needs only the decoder.

    The decoder is ``--decoder``, else the ``decoder/`` of the model recorded in the file (a local model directory
    that carries one, as the bundled model does), else the released decoder for the encoder recorded in the file,
    else the profile's ``model.decoder.path``.
    """
    from safetensors import safe_open

    from scale_rae_core.config import EncoderSettings
    from scale_rae_core.infer.loading import DEFAULT_DECODERS, carried_decoder, load_pixel_decoder
    from scale_rae_core.version import __version__

    meta: dict[str, str] = {}
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception:  # load_latent below reports the problem in one line
            meta = {}
    kind = meta.get("encoder_kind") or ""
    model = meta.get("model")
    spec = decoder_spec or carried_decoder(model) or DEFAULT_DECODERS.get(kind) or profile.model.decoder.path
    if not spec:
        made_by = f" (its model {model} carries no decoder/)" if model else ""
        raise ConfigError(f"latent decode {path}: no decoder known{made_by}; pass --decoder DIR_OR_REPO or set "
                          "model.decoder.path in the profile")
    backend, runtime = open_backend(profile, dtype)
    with backend:
        start = time.perf_counter()
        encoder = EncoderSettings(kind=kind or profile.model.encoder.kind, path=meta.get("encoder_path") or profile.model.encoder.path)
        decoder, source = load_pixel_decoder(spec, encoder, runtime.device)
        load_s = seconds_since(start)
        latent = load_latent(path, decoder.cfg.num_patches, decoder.cfg.latent_dim)
        start = time.perf_counter()
        pixels = decode_pixels(decoder, latent.tokens, runtime)  # (n, 3, H, W) in [0, 1]
        decode_s = seconds_since(start)
    label = meta.get("prompt") or path.stem
    written = []
    for k in range(pixels.shape[0]):
        stem = claim_stem(out_dir, label, int(meta["seed"]) if meta.get("seed", "").isdigit() else None)
        png = write_png(stem.with_suffix(".png"), pixels[k])
        write_manifest(stem.with_suffix(".json"), {
            "mode": "latent-decode",
            "srae_version": __version__,
            "latent_path": str(path),
            "latent_format": "reference-pt" if latent.is_reference else "srae",
            "latent_index": k,
            "source": meta,
            "decoder": source.describe(),
            "device": str(runtime.device),
            "dtype": runtime.dtype,
            "image": png.name,
            "image_size": list(pixels.shape[-2:]),
            "timings_s": {"load": load_s, "decode": decode_s},
        })
        written.append(png)
    return written


# ----------------------------------------------------------------------------------------------------
# A questions file: many (image, question) pairs, one model load, answered in batches
# ----------------------------------------------------------------------------------------------------
#
# Q.jsonl holds one {"image": PATH, "question": TEXT[, "id": ID]} per line (PATH relative to Q.jsonl's folder; ID
# defaults to the line number). Answers are appended to ANSWERS.jsonl, one line per id as each batch finishes:
# {"id", "image", "question", "answer", "seconds" (the question's share of its batch), "batch"}. A rerun skips the
# ids already there (a line cut off by an interrupted run is dropped and asked again). A bad line or an unreadable
# image is rejected in one line into ANSWERS.rejects.jsonl ({"line", "id", "error"}, rewritten each run) and the
# rest go on.

REJECTS_SUFFIX = ".rejects.jsonl"


@dataclass(frozen=True)
class Question:
    id: str
    image: Path  # resolved against the questions file's folder
    given: str  # the image path as the file writes it
    question: str
    line: int


@dataclass
class BatchAnswers:
    answers: Path
    rejects: Path | None  # None: nothing was rejected
    answered: int  # by this run
    skipped: int  # already in the answers file
    rejected: int
    seconds: float  # reading, encoding and answering (model loading excluded)


def _check_question(item: Any, n: int, seen: dict[str, int]) -> tuple[str, str]:
    """The error of one parsed line ("" if none) and its id."""
    if not isinstance(item, dict):
        return "not a JSON object with \"image\" and \"question\"", ""
    qid = item.get("id", n)
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        return "\"id\" must be a string or an integer", ""
    qid = str(qid)
    image, question = item.get("image"), item.get("question")
    if not isinstance(image, str) or not image.strip():
        return "\"image\" must be a non-empty string (a path, relative to the questions file)", qid
    if not isinstance(question, str) or not question.strip():
        return "\"question\" must be a non-empty string", qid
    if question.count(IMAGE_MARKER) > 1:
        return "the question has several <image> markers; one image goes with each question", qid
    if qid in seen:
        return f"id {qid!r} repeats line {seen[qid]}; give every question its own id", qid
    return "", qid


def read_questions(path: Path) -> tuple[list[Question], list[dict[str, Any]]]:
    """A questions file -> its questions and its rejected lines (``{"line", "id", "error"}``)."""
    import json

    if not path.is_file():
        raise DataError(f"--questions-file {path}: not found; pass a JSONL file with one {{\"image\", \"question\"[, \"id\"]}} per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"--questions-file {path}: not UTF-8 text; pass a JSONL file") from None
    questions: list[Question] = []
    rejects: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            item = None
        error, qid = _check_question(item, n, seen) if item is not None else ("not JSON", "")
        if error:
            rejects.append({"line": n, "id": qid or None, "error": error})
            continue
        seen[qid] = n
        image = Path(item["image"]).expanduser()
        questions.append(Question(qid, image if image.is_absolute() else path.parent / image, item["image"],
                                  item["question"], n))
    return questions, rejects


def answered_ids(answers: Path) -> set[str]:
    """The ids an answers file already holds; a last line cut off by an interrupted run is removed first."""
    import json

    if not answers.is_file():
        return set()
    data = answers.read_bytes()
    if data and not data.endswith(b"\n"):
        with answers.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    done = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"--out {answers}: holds a line that is not JSON; it is not an answers file, pass another --out") from None
        if isinstance(record, dict) and "id" in record and "answer" in record:
            done.add(str(record["id"]))
    return done


def answer_questions_file(
    session: Session, questions_file: Path, answers: Path, *, batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, reporter: Any = None,
) -> BatchAnswers:
    """``srae understand --questions-file Q.jsonl``: every question not yet in ``answers``, ``batch_size`` at a time
    through :func:`answer_images` (one model load for all)."""
    import json

    from scale_rae_core.data.images import open_image_file
    from scale_rae_core.events import Reporter
    from scale_rae_core.files import atomic_write

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    start = time.perf_counter()
    questions, rejects = read_questions(questions_file)
    done = answered_ids(answers)
    todo = [q for q in questions if q.id not in done]
    answers.parent.mkdir(parents=True, exist_ok=True)
    answered = 0
    with answers.open("a", encoding="utf-8") as out, (reporter or Reporter()).task("understand", total=len(todo)) as advance:
        for b0 in range(0, len(todo), batch_size):
            batch, images = [], []
            for q in todo[b0:b0 + batch_size]:
                try:
                    images.append(open_image_file(q.image))
                    batch.append(q)
                except DataError as err:
                    rejects.append({"line": q.line, "id": q.id, "error": str(err)})
            if batch:
                t0 = time.perf_counter()
                texts = answer_images(session, images, [q.question for q in batch], max_new_tokens)
                share = round(seconds_since(t0) / len(batch), 4)
                for q, text in zip(batch, texts, strict=True):
                    out.write(json.dumps({"id": q.id, "image": q.given, "question": q.question, "answer": text,
                                          "seconds": share, "batch": len(batch)}, ensure_ascii=False) + "\n")
                out.flush()
                answered += len(batch)
            advance(len(todo[b0:b0 + batch_size]))
    rejects_path = answers.with_name(answers.name.removesuffix(".jsonl") + REJECTS_SUFFIX)
    rejects_path.unlink(missing_ok=True)  # the last run's rejects are not this run's
    if rejects:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(rejects, key=lambda r: r["line"]))
        atomic_write(rejects_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return BatchAnswers(answers, rejects_path if rejects else None, answered, len(questions) - len(todo), len(rejects),
                        seconds_since(start))
