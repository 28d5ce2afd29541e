"""What inference writes: collision-free file names, PNGs, latent files and manifests.

Every output of one image shares a stem ``{index:05d}-{slug}-s{seed}`` (``00012-a-red-circle-s42``): ``.png``,
``.json`` (the manifest) and, with ``--save-latent``, ``.safetensors``. ``index`` continues after the highest index
already in the folder, and a stem is claimed by creating its manifest with ``O_EXCL`` first, so two runs writing to
the same folder never overwrite each other (a taken stem moves on to the next index). Files are written to a
temporary name and renamed into place. Nothing in the folder is read and rewritten (only new stems are made), so
``srae generate`` takes no folder lock: two generations into one ``--out`` are fine. Manifests are strict JSON: a
NaN or infinite value is refused in one line (:func:`scale_rae_core.files.finite_json`), never written.

Latent files (``.safetensors``) hold one tensor ``latent`` of shape (n·N, C) — the reference's layout for its bare
``.pt`` tensors — in the encoder's feature space (after the head's output was de-normalised), plus string metadata:
``format = srae-latent``, ``num_images``, ``tokens_per_image``, ``channels``, ``encoder_kind``, ``encoder_path`` and
the generation settings. :func:`load_latent` reads these and the reference ``.pt`` files (a bare tensor
(256·n, C), loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.files import atomic_write, finite_json, read_plain_tensor

LATENT_FORMAT = "srae-latent"
LATENT_KEY = "latent"
_INDEX_RE = re.compile(r"^(\d{5,})-")
INT64 = (-(2**63), 2**63 - 1)  # the seeds torch's generators (and every manifest reader) take


def check_seeds(seed: int, count: int, flag: str = "--seed") -> None:
    """Seeds ``seed .. seed + count - 1`` must be 64-bit integers."""
    if not INT64[0] <= seed <= INT64[1] - max(count - 1, 0):
        many = f" (and the next {count - 1}, one per image)" if count > 1 else ""
        raise ConfigError(f"{flag} {seed}: a seed{many} must lie in the 64-bit range [{INT64[0]}, {INT64[1]}]")


def slugify(text: str, max_len: int = 40) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_len`` characters ('image' when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "image"


def _next_index(out_dir: Path) -> int:
    indices = [int(m.group(1)) for p in out_dir.iterdir() if (m := _INDEX_RE.match(p.name))]
    return max(indices, default=-1) + 1


def claim_stem(out_dir: Path, label: str, seed: int | None) -> Path:
    """Reserve a fresh ``{index:05d}-{slug}[-s{seed}]`` stem in ``out_dir`` (its ``.json`` is created empty)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-s{seed}" if seed is not None else ""
    index = _next_index(out_dir)
    while True:
        stem = out_dir / f"{index:05d}-{slugify(label)}{suffix}"
        taken = any(stem.with_suffix(ext).exists() for ext in (".png", ".safetensors"))
        if not taken:
            try:
                fd = os.open(stem.with_suffix(".json"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                return stem
            except FileExistsError:
                pass
        index += 1




def write_png(path: Path, pixels: torch.Tensor) -> Path:
    """``pixels`` (3, H, W) in [0, 1] (clamped here) -> an RGB PNG."""
    from PIL import Image

    arr = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return atomic_write(path, lambda tmp: Image.fromarray(arr, mode="RGB").save(tmp, format="PNG"))


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    text = finite_json(manifest, str(path), indent=2, ensure_ascii=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# Latent files
# ----------------------------------------------------------------------------------------------------


@dataclass
class LatentFile:
    tokens: torch.Tensor  # (n_images, N, C) float32, encoder feature space
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)  # empty for a reference .pt

    @property
    def is_reference(self) -> bool:
        return not self.metadata


def save_latent(path: Path, tokens: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """``tokens`` (n, N, C) -> ``path`` (.safetensors) as (n·N, C) with shape/encoder metadata."""
    from safetensors.torch import save_file

    n, N, C = tokens.shape
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items() if v is not None}
    meta.update(format=LATENT_FORMAT, num_images=str(n), tokens_per_image=str(N), channels=str(C))
    flat = tokens.detach().float().reshape(n * N, C).contiguous().cpu()  # (n·256, 1152)
    return atomic_write(path, lambda tmp: save_file({LATENT_KEY: flat}, tmp, metadata=meta))


def load_latent(path: Path, tokens_per_image: int, channels: int) -> LatentFile:
    """Our ``.safetensors`` latent or a reference ``.pt`` tensor -> (n, N, C); checked against the model's N and C."""
    flag = f"latent file {path}"
    if not path.is_file():
        raise DataError(f"{flag}: not found; pass a .safetensors written by `srae generate --save-latent` or a reference .pt")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                if metadata.get("format") != LATENT_FORMAT or LATENT_KEY not in f.keys():
                    raise DataError(f"{flag}: not an srae latent (needs tensor '{LATENT_KEY}' and format={LATENT_FORMAT})")
                raw = f.get_tensor(LATENT_KEY)
        except SafetensorError as exc:
            raise DataError(f"{flag}: unreadable safetensors ({exc}); regenerate it") from None
    else:
        raw = read_plain_tensor(path, "a tensor (256·n, C)", fix="pass a reference latent .pt", error=DataError)
    if raw.ndim == 3:
        raw = raw.reshape(-1, raw.shape[-1])
    if raw.ndim != 2 or raw.shape[0] == 0 or raw.shape[0] % tokens_per_image:
        raise DataError(
            f"{flag}: shape {tuple(raw.shape)} is not ({tokens_per_image}·n, C); it was not made for this model's "
            f"{tokens_per_image}-token images"
        )
    if raw.shape[1] != channels:
        raise DataError(
            f"{flag}: {raw.shape[1]} channels but the model's encoder has {channels}; use a latent from the same encoder"
        )
    tokens = raw.float().reshape(-1, tokens_per_image, channels)  # (n, 256, 1152)
    if not torch.isfinite(tokens).all():
        raise DataError(f"{flag}: contains NaN or inf; regenerate it")
    return LatentFile(tokens, path, metadata)
