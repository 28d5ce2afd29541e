"""The language side of the unified model: sequences, image tokens, projector, latent queries.

One sequence carries both tasks. A conversation in the reference format
(``[{"from": "human"|"gpt", "value": "... <image> ..."}]``) is rendered with the Qwen chat template,
every ``<image>`` becomes ``<im_start>`` + N image positions + ``<im_end>`` (N = encoder tokens per
image, 256 for the released models) and each image is either

* a **context image** (in a user turn): its encoder tokens go through ``mm_projector`` into the
  sequence, the model reads it (understanding), or
* an **answer image** (in an assistant turn): the N positions hold the learnable ``latent_queries``;
  the LLM's final hidden states there go through ``diff_head_projector`` and condition the diffusion
  head token by token, whose target is the image's clean encoder tokens (generation).

The diffusion head itself lives elsewhere; :class:`UnifiedLM` returns the CE loss and the per-token
conditions and the trainer adds ``2.0 × flow loss`` (reference §4.1).

Shapes: B samples, L = max_len positions, M image slots per sample, N tokens per image, C encoder
channels, d LLM width, Z condition width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.models.tokenizer import PAD_TOKEN, TURN_END, TURN_START
from scale_rae_core.prompts import DEFAULT_SYSTEM_MESSAGE, IMAGE_END, IMAGE_MARKER, IMAGE_START

IGNORE_INDEX = -100  # label of a position that is not supervised (torch CrossEntropyLoss default)
IMAGE_PLACEHOLDER_ID = -200  # input id at image positions (the reference's IMAGE_TOKEN_INDEX)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------------
# Special tokens
# ----------------------------------------------------------------------------------------------------


class ImageTokenIds(NamedTuple):
    im_start: int
    im_end: int


def image_token_ids(tokenizer: PreTrainedTokenizerBase) -> ImageTokenIds:
    """Ids of ``<im_start>`` / ``<im_end>``; ConfigError when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE_START, IMAGE_END) if t not in vocab]
    if missing:
        raise ConfigError(
            f"tokenizer has no {' / '.join(missing)} token; load the Scale-RAE tokenizer or call "
            "scale_rae_core.models.llm.add_image_tokens(tokenizer, model) first"
        )
    return ImageTokenIds(vocab[IMAGE_START], vocab[IMAGE_END])


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that end a turn in decoding: ``<|im_end|>``, the pad token and the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in (TURN_END, PAD_TOKEN) if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def add_image_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> ImageTokenIds:
    """Add ``<im_start>`` / ``<im_end>`` to a Qwen2 tokenizer and its model, as the reference does.

    The tokens are appended as special tokens (ids 151665 / 151666 on Qwen2.5), the embeddings are
    resized to ``len(tokenizer)`` (on Qwen2.5 this *shrinks* the 151936-row padded matrix to 151667,
    the size of the released checkpoints) and the new rows of the input and of the output embedding
    are set to the mean of the rows before them.

    ``<image>`` is deliberately not added: :func:`build_sample` splits the text on it before
    tokenising, which gives the same ids as the reference's temporary special token without a
    vocabulary row that the released checkpoints do not have.
    """
    n_new = tokenizer.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # new rows are set just below
    if n_new > 0:
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is None:
                    continue
                w = emb.weight  # (V, d); the same tensor twice when embeddings are tied
                w[-n_new:] = w[:-n_new].mean(dim=0, keepdim=True)
    return image_token_ids(tokenizer)


# ----------------------------------------------------------------------------------------------------
# Sequence building
# ----------------------------------------------------------------------------------------------------


class SequenceTooLongError(DataError):
    """A sample does not fit in ``max_len`` positions; the trainer skips these and counts them."""


@dataclass
class TokenizedSample:
    """One conversation as ids. ``image_starts[k]`` is the first of image k's N positions."""

    input_ids: list[int]  # IMAGE_PLACEHOLDER_ID at image positions
    labels: list[int]  # IGNORE_INDEX where not supervised
    image_starts: list[int] = field(default_factory=list)
    answer_image_mask: list[bool] = field(default_factory=list)  # True: answer image (generation target)
    num_image_tokens: int = 0

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)

    @property
    def image_positions(self) -> list[list[int]]:
        """Sequence positions of each image's N tokens, in order of appearance."""
        return [list(range(s, s + self.num_image_tokens)) for s in self.image_starts]


def _turns(conversations: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    if not conversations:
        raise DataError("conversation is empty; a sample needs at least one turn")
    turns = []
    for i, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in _ROLES:
            raise DataError(
                f"conversation turn {i} has role {role!r}; use 'from': 'human' or 'gpt' "
                "(or 'role': 'user' / 'assistant')"
            )
        if not isinstance(text, str):
            raise DataError(f"conversation turn {i} has no text; give it a 'value' string")
        if _ROLES[role] == "system" and i != 0:
            raise DataError(f"conversation turn {i} is a system turn; only the first turn may be one")
        turns.append((_ROLES[role], text))
    return turns


def build_sample(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    num_image_tokens: int,
    max_len: int,
    *,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
    add_generation_prompt: bool = False,
) -> TokenizedSample:
    """Render a conversation with the Qwen chat template and tokenise it with labels.

    The text is ``<|im_start|>system\\n{system}<|im_end|>\\n`` followed by one
    ``<|im_start|>{user|assistant}\\n{value}<|im_end|>\\n`` block per turn (a leading ``system``
    turn replaces the default system message). Each ``<image>`` in a value becomes ``<im_start>``,
    ``num_image_tokens`` positions holding :data:`IMAGE_PLACEHOLDER_ID`, ``<im_end>``.
    With ``add_generation_prompt`` an open ``<|im_start|>assistant\\n`` ends the sequence (inference).

    Labels (what the CE loss trains):

    * every token of an assistant turn is supervised, header ``<|im_start|>assistant\\n`` and the
      closing ``<|im_end|>\\n`` included; so is the ``<im_start>`` that opens an answer image and
      the ``<im_end>`` after it;
    * the system and user turns are masked entirely, including their ``\\n``, ``<|im_start|>`` and
      ``<|im_end|>``. The reference (``preprocess_qwen``) additionally un-masks those three tokens
      everywhere, which trains the model to predict user-side text (reference §8 item 9); we don't;
    * image positions are always masked.

    An image in an assistant turn is an answer image, one in a user turn a context image; the data
    pipeline supplies encoder tokens for every image in order of appearance.

    A sample longer than ``max_len`` raises :class:`SequenceTooLongError` (a ``DataError``); nothing
    is truncated, so neither supervised text nor an image is ever cut. The trainer catches this
    error to skip the sample.
    """
    if num_image_tokens <= 0:
        raise ConfigError(
            f"num_image_tokens is {num_image_tokens}; it must be the encoder's token count (> 0)"
        )
    image_token_ids(tokenizer)  # fail early when the tokenizer lacks the image tokens
    turns = _turns(conversations)
    if turns[0][0] == "system":
        system_message = turns.pop(0)[1]
    turns.insert(0, ("system", system_message))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sample = TokenizedSample([], [], num_image_tokens=num_image_tokens)
    for role, value in turns:
        supervised = role == "assistant"
        if IMAGE_MARKER in value and role == "system":
            raise DataError("the system turn contains <image>; images go in user or assistant turns")
        text = value.replace(IMAGE_MARKER, IMAGE_START + IMAGE_MARKER + IMAGE_END)
        chunks = f"{TURN_START}{role}\n{text}{TURN_END}\n".split(IMAGE_MARKER)
        for k, chunk in enumerate(chunks):
            if k > 0:  # an image sits between chunk k-1 and chunk k
                sample.image_starts.append(len(sample.input_ids))
                sample.answer_image_mask.append(supervised)
                sample.input_ids += [IMAGE_PLACEHOLDER_ID] * num_image_tokens
                sample.labels += [IGNORE_INDEX] * num_image_tokens
            ids = encode(chunk)
            sample.input_ids += ids
            sample.labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    if add_generation_prompt:
        ids = encode(f"{TURN_START}assistant\n")
        sample.input_ids += ids
        sample.labels += [IGNORE_INDEX] * len(ids)

    if len(sample.input_ids) > max_len:
        n_img = len(sample.image_starts)
        raise SequenceTooLongError(
            f"sample has {len(sample.input_ids)} tokens ({n_img} image(s) × {num_image_tokens}) but "
            f"max_len is {max_len}; raise max_len or drop the sample"
        )
    return sample


def collate(
    samples: Sequence[TokenizedSample],
    max_len: int,
    pad_id: int,
    *,
    max_images: int = 1,
    image_features: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch to exactly ``max_len`` positions and ``max_images`` image slots (static shapes).

    Returns ``input_ids`` / ``labels`` / ``attention_mask`` (B, L) padded on the right with
    ``pad_id`` / -100 / 0; ``image_positions`` (B, M, N) sequence index of every image token (0 in an
    empty slot); ``image_valid`` (B, M) which slots hold an image; ``answer_image_mask`` (B, M) which
    hold an answer image. With ``image_features`` (one (n_images_i, N, C) tensor per sample, in order of
    appearance; (0, N, C) for a text-only sample) also
    ``image_features`` (B, M, N, C), zeros in empty slots. The shapes depend only on
    (B, max_len, max_images, N, C), never on the content, so an XLA graph compiles once.
    """
    if not samples:
        raise DataError("collate got an empty batch")
    n_tok = samples[0].num_image_tokens
    B, L, M = len(samples), max_len, max_images
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    image_positions = torch.zeros(B, M, n_tok, dtype=torch.long)
    image_valid = torch.zeros(B, M, dtype=torch.bool)
    answer_image_mask = torch.zeros(B, M, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        if n > L:
            raise SequenceTooLongError(f"sample {b} has {n} tokens but max_len is {L}; raise max_len")
        if len(s.image_starts) > M:
            raise DataError(
                f"sample {b} has {len(s.image_starts)} images but max_images is {M}; raise max_images "
                "or drop the sample"
            )
        if s.num_image_tokens != n_tok:
            raise DataError(f"sample {b} uses {s.num_image_tokens} tokens per image, sample 0 uses {n_tok}")
        input_ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        attention_mask[b, :n] = 1
        for k, start in enumerate(s.image_starts):
            image_positions[b, k] = torch.arange(start, start + n_tok)
            image_valid[b, k] = True
            answer_image_mask[b, k] = s.answer_image_mask[k]
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "image_positions": image_positions,
        "image_valid": image_valid,
        "answer_image_mask": answer_image_mask,
    }
    if image_features is not None:
        if len(image_features) != B:
            raise DataError(f"got image features for {len(image_features)} samples, batch has {B}")
        C = image_features[0].shape[-1]
        feats = torch.zeros(B, M, n_tok, C)
        for b, (s, f) in enumerate(zip(samples, image_features, strict=True)):
            n_img = len(s.image_starts)
            if tuple(f.shape) != (n_img, n_tok, C):
                raise DataError(
                    f"sample {b}: image features have shape {tuple(f.shape)}, expected {(n_img, n_tok, C)}"
                )
            feats[b, :n_img] = f[:n_img].to(feats.dtype)
        batch["image_features"] = feats
    return batch


# ----------------------------------------------------------------------------------------------------
# The unified model (LLM + projector + latent queries + condition projector)
# ----------------------------------------------------------------------------------------------------


@dataclass
class UnifiedLMConfig:
    encoder_channels: int = 1152  # C: encoder token width (SigLIP-2 so400m 1152, WebSSL-DINO 300M 1024)
    num_image_tokens: int = 256  # N: encoder tokens per image (16 × 16)
    z_channels: int = 2048  # Z: width of the per-token diffusion-head conditions

    def __post_init__(self) -> None:
        for name in ("encoder_channels", "num_image_tokens", "z_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} is {getattr(self, name)}; it must be > 0")


@dataclass
class Decoded:
    """What :meth:`UnifiedLM.decode` wrote for each of B prompts."""

    tokens: list[list[int]]  # per row: the text ids, then the id it ended on (<im_start> or a stop id), if any
    opened: list[bool]  # the row ends with <im_start>: an answer image follows, its conditions are valid
    forced: list[bool]  # that <im_start> was forced (force_image, at a stop id or the token limit)
    conditions: torch.Tensor | None  # (B, N, Z) of the opened images; zeros for other rows; None if none opened


def _left_pad(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (T_i, d) -> embeddings (B, T, d) padded with zeros on the left, and their mask (B, T)."""
    B, T = len(prompts), max(p.shape[0] for p in prompts)
    embeds = prompts[0].new_zeros(B, T, prompts[0].shape[-1])
    mask = torch.zeros(B, T, dtype=torch.long, device=embeds.device)
    for r, p in enumerate(prompts):  # every row's last prompt token sits at T − 1
        embeds[r, T - p.shape[0] :] = p
        mask[r, T - p.shape[0] :] = 1
    return embeds, mask


class UnifiedLM(nn.Module):
    """A Qwen2 causal LM with the Scale-RAE image interfaces around it.

    ``llm`` is a transformers ``Qwen2ForCausalLM`` (built from a config or loaded from a checkpoint);
    its width d sets the projectors' sizes. Parameters (reference names in ``models.adapters.scale_rae.to_reference_key``):
    ``mm_projector`` Linear(C→d) → GELU → Linear(d→d); ``latent_queries`` (N, d) ~ N(0, 1)/√d;
    ``diff_head_projector`` Linear(d→Z).
    """

    def __init__(self, cfg: UnifiedLMConfig, llm: PreTrainedModel) -> None:
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        d = llm.config.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(cfg.encoder_channels, d), nn.GELU(), nn.Linear(d, d))
        self.latent_queries = nn.Parameter(torch.randn(cfg.num_image_tokens, d) / d**0.5)
        self.diff_head_projector = nn.Linear(d, cfg.z_channels)

    @property
    def hidden_size(self) -> int:
        return self.llm.config.hidden_size

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, d); image placeholders (negative ids) embed as id 0."""
        return self.llm.get_input_embeddings()(input_ids.clamp(min=0))

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (..., N, C) → LLM embeddings (..., N, d)."""
        return self.mm_projector(features.to(self.mm_projector[0].weight.dtype))

    def conditions(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states at answer-image positions (..., N, d) → diffusion conditions (..., N, Z)."""
        return self.diff_head_projector(hidden.to(self.diff_head_projector.weight.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        image_positions: torch.Tensor,
        answer_image_mask: torch.Tensor,
        image_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sequence embeddings (B, L, d): text from ``embed_tokens``, context images from
        ``mm_projector(image_features)``, answer images from ``latent_queries``.

        ``image_features`` (B, M, N, C), ``image_positions`` (B, M, N), ``answer_image_mask`` and
        ``image_valid`` (B, M) as produced by :func:`collate`; ``image_valid=None`` means every slot
        holds an image. Shapes stay static: every slot is projected, empty ones are dropped.
        """
        B, L = input_ids.shape
        _, M, N = image_positions.shape
        text = self.embed_text(input_ids)  # (B, L, d)
        d = text.shape[-1]
        projected = self.project_features(image_features).to(text.dtype)  # (B, M, N, d)
        queries = self.latent_queries.to(text.dtype).expand(B, M, N, d)
        images = torch.where(answer_image_mask[..., None, None], queries, projected)  # (B, M, N, d)
        if image_valid is None:
            image_valid = torch.ones(B, M, dtype=torch.bool, device=input_ids.device)
        # Empty slots write to an extra column L that is cut off afterwards.
        index = torch.where(image_valid[..., None], image_positions, L).reshape(B, M * N)
        buf = text.new_zeros(B, L + 1, d).scatter(
            1, index[..., None].expand(-1, -1, d), images.reshape(B, M * N, d)
        )
        is_image = torch.zeros(B, L + 1, dtype=torch.bool, device=text.device)
        is_image = is_image.scatter(1, index, True)
        return torch.where(is_image[:, :L, None], buf[:, :L], text)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training step without the diffusion head.

        Returns ``ce_loss`` (mean over supervised next-token targets of the batch, HF shift; 0 when
        none), ``image_conditions`` (B·M, N, Z) for every image slot in (sample, slot) order — the
        diffusion loss counts only ``answer_image_mask.flatten()`` and its targets are
        ``image_features.flatten(0, 1)`` — and the final post-norm ``hidden_states`` (B, L, d).
        """
        embeds = self.embed(
            batch["input_ids"],
            batch["image_features"],
            batch["image_positions"],
            batch["answer_image_mask"],
            batch.get("image_valid"),
        )
        out = self.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False)
        hidden = out.last_hidden_state  # (B, L, d), after the final RMSNorm
        logits = self.llm.lm_head(hidden).float()  # (B, L, V)
        targets = batch["labels"][:, 1:]  # position t predicts token t+1
        ce_sum = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        ce_loss = ce_sum / (targets != IGNORE_INDEX).sum().clamp(min=1)

        B, M, N = batch["image_positions"].shape
        index = batch["image_positions"].reshape(B, M * N, 1).expand(-1, -1, hidden.shape[-1])
        image_hidden = hidden.gather(1, index).reshape(B * M, N, -1)  # (B·M, N, d)
        return ce_loss, self.conditions(image_hidden), hidden

    # ---- inference ---------------------------------------------------------------------------------

    def _extend(self, embeds: torch.Tensor, mask: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Run the new positions ``embeds`` (B, T, d) on top of ``cache`` (updated in place).

        ``mask`` (B, L) covers the cached and the new positions; each row counts its positions from its
        first unmasked one, so a left-padded row sees the same positions as alone. Returns the new
        positions' final post-norm hidden states (B, T, d).
        """
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]  # (B, T)
        out = self.llm.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        return out.last_hidden_state

    @torch.no_grad()
    def decode(
        self,
        prompts: Sequence[torch.Tensor],
        *,
        max_new_tokens: int,
        stop_ids: Collection[int],
        image_start_id: int,
        force_image: bool = False,
    ) -> Decoded:
        """Greedy decoding of a batch of prompts with one KV cache, until each row opens an image or stops.

        ``prompts``: one embedded prompt (T_i, d) per row (e.g. :meth:`embed` of a :func:`build_sample`
        with ``add_generation_prompt=True``). Rows are left-padded to a common length; a row that is done
        waits on masked positions while the others go on, so every row decodes exactly as it would alone.

        A row ends when it writes ``<im_start>`` (the N latent queries are then fed after it, and its
        answer-image conditions are returned, as in the reference), a stop id (kept in its tokens), or
        ``max_new_tokens`` tokens. With ``force_image`` a stop id, or reaching the limit, is replaced by a
        forced ``<im_start>`` (so at most ``max_new_tokens`` text tokens, then ``<im_start>``; 0 forces it
        at once). One host read per generated token; the queries of all opened rows go in one last forward.
        """
        if not prompts:
            raise ConfigError("decode got no prompts")
        B = len(prompts)
        out = Decoded([[] for _ in range(B)], [False] * B, [False] * B, None)
        if max_new_tokens == 0 and not force_image:
            return out
        embeds, mask = _left_pad(prompts)  # (B, T, d), (B, T)
        cache = DynamicCache(config=self.llm.config)
        hidden = self._extend(embeds, mask, cache)
        if cache.get_seq_length() != mask.shape[1]:  # a transformers without `cache=` ignores it silently
            raise ConfigError(
                f"transformers {transformers.__version__} did not fill the KV cache passed as cache=; "
                "install transformers>=5.24 (pip install -U 'transformers>=5.24')"
            )
        done = [False] * B
        for step in range(max_new_tokens + 1):
            choice = self.llm.lm_head(hidden[:, -1]).float().argmax(-1).tolist()  # one host read per token
            fed, fed_mask = [0] * B, [0] * B  # a row that is done waits on a masked placeholder
            for r in range(B):
                if done[r]:
                    continue
                token = choice[r]
                if force_image and token != image_start_id and (token in stop_ids or step == max_new_tokens):
                    token, out.forced[r] = image_start_id, True
                out.tokens[r].append(token)
                fed[r], fed_mask[r] = token, 1
                out.opened[r] = token == image_start_id
                at_limit = not force_image and len(out.tokens[r]) == max_new_tokens
                done[r] = out.opened[r] or token in stop_ids or at_limit
            new = self.embed_text(torch.tensor(fed, device=mask.device)[:, None])  # (B, 1, d)
            mask = torch.cat([mask, torch.tensor(fed_mask, device=mask.device)[:, None]], 1)
            if all(done):
                break
            hidden = self._extend(new, mask, cache)
        if any(out.opened):
            out.conditions = self._image_conditions(new, mask, cache, out.opened)
        return out

    def _image_conditions(
        self, new: torch.Tensor, mask: torch.Tensor, cache: Cache, opened: list[bool]
    ) -> torch.Tensor:
        """The rows' last tokens ``new`` (B, 1, d) and, where ``opened``, the N latent queries, in one forward
        -> conditions (B, N, Z) of the opened images (zeros in the other rows, whose queries are masked)."""
        B, N = new.shape[0], self.cfg.num_image_tokens
        is_open = torch.tensor(opened, device=mask.device)  # (B,)
        queries = self.latent_queries.to(new.dtype).expand(B, N, -1)  # (B, N, d)
        mask = torch.cat([mask, is_open[:, None].long().expand(B, N)], 1)
        hidden = self._extend(torch.cat([new, queries], 1), mask, cache)
        conditions = self.conditions(hidden[:, -N:])  # (B, N, Z)
        return torch.where(is_open[:, None, None], conditions, torch.zeros_like(conditions))

