"""The GAN part of the decoder loss: DINO discriminator, DiffAug, GAN losses and the adaptive weight.

Discriminator (after RAE's DinoDisc): a frozen DINO ViT (transformers `ViTModel`; the reference uses
DINO v1 ViT-S/8 at 224, HF `facebook/dino-vits8`) and one small trainable head per feature map:

    x [B, 3, H, W] in [-1, 1] -> bilinear resize to the backbone's image size -> ImageNet normalisation
      -> ViT; feature maps = final block output + outputs of blocks `key_depths` (default 2, 5, 8, 11),
         CLS dropped, no final norm (so with 12 blocks block 11 appears twice, as in the reference)
      -> head per map: SNConv1d(C, C, 1) -> LocalNorm -> LeakyReLU(0.2)
                       -> (SNConv1d(C, C, 9, circular) -> LocalNorm -> LeakyReLU(0.2)) + skip, times 1/sqrt(2)
                       -> SNConv1d(C, 1, 1)
      -> per-token logits concatenated: [B, (len(key_depths) + 1) * N]

LocalNorm is the reference's BatchNormLocal with virtual_bs=1: per-sample, per-channel normalisation over
tokens (eps 1e-6, affine, no running statistics). Because every sample is normalised alone, real and fake
images may share one forward (`torch.cat([real, fake])`) with exactly the same logits as two forwards.

Distributed training (decision on the reference's per-rank discriminators, rae.md §12.4): the
discriminator's gradients ARE synchronised. The trainer wraps this module in DDP/FSDP and runs the
discriminator step through the wrapper. To make that safe the module holds trainable state only in
registered submodules (`heads`). The frozen backbone is deliberately NOT registered: it is kept in a
one-element tuple, so it is absent from `parameters()`, `state_dict()` and DDP/FSDP's bucketing, and the
saved state dict holds the heads only (the backbone comes back from its own repo id or folder). `.to()`,
`.cuda()`, `.half()` and friends still move it (see `_apply`), and it is always in eval mode. For the
generator term (gradients wanted w.r.t. the input only) call the unwrapped module with
`heads.requires_grad_(False)`, or zero the discriminator grads before its own step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from scale_rae_core.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DiscriminatorConfig:
    """The discriminator's own settings.

    backbone: HF repo id (`owner/name[@rev]`) or local folder of a transformers `ViTModel` (DINO ViT-S/8:
        `facebook/dino-vits8`), resolved by `scale_rae_core.hub` (offline: from the local cache only).
    key_depths: 0-based blocks whose outputs feed a head, besides the final block output.
    kernel_size: width of the residual Conv1d (circular padding), 9 in the reference.
    norm_eps: LocalNorm epsilon.
    revision: hub revision when `backbone` carries no `@rev`.
    """

    backbone: str = "facebook/dino-vits8"
    key_depths: tuple[int, ...] = (2, 5, 8, 11)
    kernel_size: int = 9
    norm_eps: float = 1e-6
    revision: str | None = None


# ---------------------------------------------------------------------------------------------------------
# heads


class LocalNorm(nn.Module):
    """Per-sample, per-channel normalisation over tokens of [B, C, N] (BatchNormLocal, virtual_bs=1)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        mean = x.mean(dim=2, keepdim=True)  # (B, C, 1)
        var = x.var(dim=2, keepdim=True, unbiased=False)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return (x * self.weight[None, :, None] + self.bias[None, :, None]).to(dtype)


def _sn_conv(c_in: int, c_out: int, kernel_size: int) -> nn.Module:
    mode = "circular" if kernel_size > 1 else "zeros"  # k=1 has no padding either way
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode=mode)
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12)


class _ConvNormAct(nn.Module):
    def __init__(self, channels: int, kernel_size: int, eps: float) -> None:
        super().__init__()
        self.conv = _sn_conv(channels, channels, kernel_size)
        self.norm = LocalNorm(channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class DiscHead(nn.Module):
    """[B, C, N] features -> [B, N] logits."""

    def __init__(self, channels: int, kernel_size: int = 9, eps: float = 1e-6) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ConfigError(f"discriminator kernel_size {kernel_size} must be odd (9 in the reference)")
        self.inp = _ConvNormAct(channels, 1, eps)
        self.res = _ConvNormAct(channels, kernel_size, eps)
        self.out = _sn_conv(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = (self.res(x) + x) * (1.0 / math.sqrt(2.0))
        return self.out(x).squeeze(1)  # (B, N)


# ---------------------------------------------------------------------------------------------------------
# discriminator


def _load_vit(cfg: DiscriminatorConfig) -> nn.Module:
    import transformers

    from scale_rae_core.hub import resolve_transformers

    hint = (
        "download a DINO ViTModel (e.g. `hf download facebook/dino-vits8`) and set "
        "decoder_training.disc_backbone to its repo id or folder"
    )
    if not cfg.backbone:
        raise CheckpointError(f"discriminator backbone is not set; {hint}")
    folder = str(resolve_transformers(cfg.backbone, flag="decoder_training.disc_backbone", revision=cfg.revision,
                                      hint=hint).path)
    try:
        raw, _ = transformers.PretrainedConfig.get_config_dict(folder)
    except (OSError, ValueError):
        raise CheckpointError(f"discriminator backbone {cfg.backbone!r}: no config.json found; {hint}") from None
    if raw.get("model_type") != "vit":
        raise CheckpointError(
            f"discriminator backbone {cfg.backbone!r}: model_type is {raw.get('model_type')!r}, expected 'vit' "
            f"(a transformers ViTModel); {hint}"
        )
    try:
        return transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False)
    except OSError as e:
        raise CheckpointError(
            f"discriminator backbone {cfg.backbone!r}: cannot load the weights ({type(e).__name__}); {hint}"
        ) from None


class DinoDiscriminator(nn.Module):
    """Frozen ViT backbone + trainable per-token heads. `forward(x)`: [B, 3, H, W] in [-1, 1] -> [B, M * N]."""

    def __init__(self, backbone: nn.Module, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        vcfg = backbone.config
        depth = int(vcfg.num_hidden_layers)
        bad = [d for d in cfg.key_depths if not 0 <= d < depth]
        if bad:
            raise ConfigError(
                f"discriminator key_depths {tuple(cfg.key_depths)}: block {bad[0]} does not exist in a "
                f"{depth}-block backbone; use depths in 0..{depth - 1}"
            )
        self.cfg = cfg
        self.image_size = int(vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        self.num_tokens = (self.image_size // self.patch_size) ** 2
        self.hidden_size = int(vcfg.hidden_size)
        self.key_depths = tuple(cfg.key_depths)
        backbone.requires_grad_(False)
        backbone.eval()
        self._backbone: tuple[nn.Module] = (backbone,)  # not registered: see the module docstring
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(
            DiscHead(self.hidden_size, cfg.kernel_size, cfg.norm_eps) for _ in range(len(self.key_depths) + 1)
        )

    @classmethod
    def from_pretrained(cls, cfg: DiscriminatorConfig) -> DinoDiscriminator:
        """Backbone from `cfg.backbone` (HF repo id or folder; see `DiscriminatorConfig`)."""
        return cls(_load_vit(cfg), cfg)

    @classmethod
    def random(
        cls, vit_config: Any, cfg: DiscriminatorConfig | None = None, seed: int = 0
    ) -> DinoDiscriminator:
        """A randomly initialised backbone from a `transformers.ViTConfig` (tests, offline smoke runs)."""
        import transformers

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = transformers.ViTModel(vit_config, add_pooling_layer=False)
            return cls(backbone, cfg or DiscriminatorConfig(backbone=""))

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DinoDiscriminator:
        # `.to()`, `.cuda()`, `.half()` ... go through `_apply`; carry the unregistered backbone along.
        super()._apply(fn, recurse)
        self._backbone[0]._apply(fn, recurse)
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone feature maps [B, C, N]: the final block output first, then blocks `key_depths`."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"discriminator expects [B, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
        S = self.image_size
        x = x.float()
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        x = ((x + 1.0) * 0.5 - self.mean) / self.std
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(pixel_values=x.to(dtype), output_hidden_states=True)
        hidden = out.hidden_states  # (embeddings, block 0, ..., block depth-1), each (B, 1 + N, C)
        maps = [hidden[-1]] + [hidden[d + 1] for d in self.key_depths]
        return [h[:, 1:].transpose(1, 2) for h in maps]  # CLS dropped: (B, C, N) each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [head(f) for head, f in zip(self.heads, self.features(x), strict=True)]  # each (B, N)
        return torch.cat(logits, dim=1).float()  # (B, M * N)

    def extra_repr(self) -> str:
        return (
            f"backbone={type(self.backbone).__name__}(hidden={self.hidden_size}, image={self.image_size}, "
            f"patch={self.patch_size}, frozen, not in state_dict), key_depths={self.key_depths}"
        )


# ---------------------------------------------------------------------------------------------------------
# DiffAug (differentiable augmentation, as StyleGAN-T / RAE use it)


class DiffAug:
    """Translation (integer shift up to `translation` of the side, zero fill), colour (brightness
    +U(-.5, .5), saturation x2U, contrast x(U + .5), per sample) and an optional cutout square of side
    `cutout` x the image side. Differentiable w.r.t. the input; randomness only from `generator`."""

    def __init__(self, translation: float = 0.125, color: bool = True, cutout: float = 0.0) -> None:
        if not 0.0 <= translation < 1.0 or not 0.0 <= cutout <= 1.0:
            raise ConfigError(f"DiffAug translation {translation} / cutout {cutout} must lie in [0, 1)")
        self.translation = translation
        self.color = color
        self.cutout = cutout

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        dev = generator.device if generator is not None else x.device
        u = torch.rand(7, B, generator=generator, device=dev).to(x.device)  # per-sample uniforms
        if self.translation > 0:
            x = _translate(x, u[0], u[1], self.translation)
        if self.color:
            uc = u[2:5].to(x.dtype).view(3, B, 1, 1, 1)  # keep the input dtype (bf16 stays bf16)
            x = x + (uc[0] - 0.5)  # brightness
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * (2.0 * uc[1]) + m  # saturation
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * (uc[2] + 0.5) + m  # contrast
        if self.cutout > 0:
            x = x * _cutout_mask(B, H, W, u[5], u[6], self.cutout, x.device, x.dtype)
        return x


def _translate(x: torch.Tensor, uh: torch.Tensor, uw: torch.Tensor, ratio: float) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + th_b, j + tw_b] (zero outside), th_b, tw_b integers in [-d, d]."""
    B, _, H, W = x.shape
    dh, dw = round(H * ratio), round(W * ratio)
    th = (uh * (2 * dh + 1)).floor().long() - dh  # (B,)
    tw = (uw * (2 * dw + 1)).floor().long() - dw
    padded = F.pad(x, (dw, dw, dh, dh))  # (B, C, H + 2dh, W + 2dw), zeros around
    rows = torch.arange(H, device=x.device)[None, :] + dh + th[:, None]  # (B, H)
    cols = torch.arange(W, device=x.device)[None, :] + dw + tw[:, None]  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def _cutout_mask(
    B: int,
    H: int,
    W: int,
    uh: torch.Tensor,
    uw: torch.Tensor,
    ratio: float,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[B, 1, H, W] mask, 0 inside a (ratio*H) x (ratio*W) box centred at a uniform random pixel."""
    ch, cw = round(H * ratio), round(W * ratio)
    top = (uh * H).floor().long() - ch // 2  # (B,)
    left = (uw * W).floor().long() - cw // 2
    r = torch.arange(H, device=device)[None, :]
    c = torch.arange(W, device=device)[None, :]
    in_r = (r >= top[:, None]) & (r < top[:, None] + ch)  # (B, H)
    in_c = (c >= left[:, None]) & (c < left[:, None] + cw)  # (B, W)
    return (~(in_r[:, :, None] & in_c[:, None, :])).to(dtype)[:, None]


# ---------------------------------------------------------------------------------------------------------
# losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(real)) + mean softplus(D(fake)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(fake)."""
    return -logits_fake.mean()


def disc_accuracy(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Fraction of logits where D(real) > D(fake) (logging only)."""
    return (logits_real > logits_fake).float().mean()


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and round to the 256 levels an 8-bit image has (fakes for the discriminator step)."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's balance ||d rec / dW|| / (||d g / dW|| + 1e-6), clamped to [0, max_weight], detached.

    W is the decoder's last layer weight. Both gradients are taken with `torch.autograd.grad`
    (retain_graph=True, so the caller's backward still works; nothing accumulates into `.grad`) and the
    norms are computed in fp32 outside autocast. The value is per rank (local batch); a trainer that wants
    one value everywhere averages it through its backend. With FSDP2 the grads are DTensors and the norms
    are global.
    """
    device_type = last_layer_weight.device.type
    use_ctx = torch.amp.autocast_mode.is_autocast_available(device_type)
    ctx = torch.autocast(device_type=device_type, enabled=False) if use_ctx else contextlib.nullcontext()
    with ctx:
        (g_rec,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
        (g_gan,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
        weight = torch.linalg.vector_norm(g_rec.float()) / (torch.linalg.vector_norm(g_gan.float()) + 1e-6)
        return weight.clamp(0.0, max_weight).detach()
