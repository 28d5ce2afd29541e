"""Where the flow head's start noise (and an SDE sampler's step noise) comes from: ``--noise`` / ``--noise-file``.

Three sources, one per way of reproducing an image:

* ``seed`` (default, :class:`SeedNoise`): image k's noise comes from its own CPU generator
  ``torch.Generator().manual_seed(seed_k)`` and is moved to the device, so an image depends only on its seed — not
  on its batch, its device or anything drawn before it.
* ``reference`` (:class:`ReferenceNoise`): as the released CLI draws it (reference notes §5, ``inference/cli.py`` +
  ``diffloss.infer``): torch's *global* generator seeded once with ``--seed`` (``torch.manual_seed``: the CPU and
  every CUDA generator), then per image, in the order the images are made, one
  ``torch.randn((1, C, g, g), device=<the model's device>)`` in float32 (the released CLI holds its weights in
  float32); CFG duplicates that noise without drawing again. The released CLI seeds before loading its model; srae's
  loader draws nothing from the device's generator, so seeding when the run starts gives the same draws. On CUDA
  this reproduces a published sample; on CPU the released loader itself draws from the CPU generator (its latent
  queries' init), which srae does not replay: use CUDA, or ``--noise-file``. Image k of a run takes draw k, so the
  run must make its images in the same order (prompts in order, ``--n`` images each). An SDE sampler's step noise
  then comes from the same generator.
* ``file`` (:class:`FileNoise`, ``--noise-file X.safetensors``): one tensor (C, g, g) per image, stacked (K, C, g, g)
  as the released head's ``x_end``, taken in the order the images are made; K must be the run's image count.

Every source returns float32 noise: the sampler's state stays float32 whatever dtype the weights are held in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scale_rae_core.errors import DataError
from scale_rae_core.flow.sampler import NoiseFn, PerSampleNoise

NOISE_MODES = ("seed", "reference")
NOISE_KEY = "noise"  # the tensor's name in a --noise-file (or its only tensor, whatever the name)


class SeedNoise:
    """Per-image CPU generators seeded with each image's seed (see the module docstring)."""

    kind = "seed"

    def check(self, images: int, shape: tuple[int, ...]) -> None:
        """Nothing to check: every seed gives noise of any shape."""
        del images, shape

    @property
    def next_index(self) -> int:
        """The next image's place in the source's order: -1, seed noise has none (an image is its seed)."""
        return -1

    def start(self, seeds: list[int], shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, NoiseFn]:
        """(start noise (B, *shape) float32 on ``device``, the SDE samplers' step noise) for images of ``seeds``."""
        noise = PerSampleNoise(seeds, device)
        return noise((len(seeds), *shape)), noise


class ReferenceNoise:
    """torch's global generator, seeded once with ``seed`` (see the module docstring)."""

    kind = "reference"

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.drawn = 0  # images drawn so far

    def check(self, images: int, shape: tuple[int, ...]) -> None:
        """Seed the global generator: the run starts here."""
        del images, shape
        torch.manual_seed(self.seed)
        self.drawn = 0

    def step_noise(self, device: torch.device) -> NoiseFn:
        return lambda shape: torch.randn(tuple(shape), device=device, dtype=torch.float32)

    @property
    def next_index(self) -> int:
        return self.drawn

    def start(self, seeds: list[int], shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, NoiseFn]:
        rows = [torch.randn((1, *shape), device=device, dtype=torch.float32) for _ in seeds]  # one draw per image
        self.drawn += len(seeds)
        return torch.cat(rows), self.step_noise(device)


class FileNoise:
    """Start noise read from a safetensors file, one (C, g, g) row per image (see the module docstring)."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.noise = read_noise_file(self.path)  # (K, C, g, g) float32, on the CPU
        self.taken = 0

    def check(self, images: int, shape: tuple[int, ...]) -> None:
        want = (images, *shape)
        if tuple(self.noise.shape) != want:
            raise DataError(
                f"--noise-file {self.path}: holds a {tuple(self.noise.shape)} tensor but this run makes {images} image(s) "
                f"of {tuple(shape)} noise; write one {want} float tensor (image k of the run takes row k)"
            )
        self.taken = 0

    @property
    def next_index(self) -> int:
        return self.taken

    def start(self, seeds: list[int], shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, NoiseFn]:
        rows = self.noise[self.taken:self.taken + len(seeds)]
        assert tuple(rows.shape) == (len(seeds), *shape), "check() ran with this run's image count"
        self.taken += len(seeds)
        return rows.to(device), PerSampleNoise(seeds, device)


StartNoise = SeedNoise | ReferenceNoise | FileNoise


def read_noise_file(path: Path) -> torch.Tensor:
    """The noise tensor of a ``--noise-file`` (named ``noise``, or the file's only tensor) as float32 (K, C, g, g)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise DataError(f"--noise-file {path}: not found; pass a .safetensors file holding one (K, C, g, g) tensor")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            name = NOISE_KEY if NOISE_KEY in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise DataError(f"--noise-file {path}: holds {len(names)} tensors and none is named '{NOISE_KEY}'; "
                                f"store the noise as '{NOISE_KEY}'")
            noise = f.get_tensor(name)
    except (OSError, SafetensorError) as exc:
        raise DataError(f"--noise-file {path}: not a readable safetensors file ({str(exc)[:120]}); write one with "
                        "safetensors.torch.save_file({'noise': tensor}, path)") from None
    if noise.dim() != 4 or not noise.is_floating_point():
        raise DataError(f"--noise-file {path}: '{name}' is a {noise.dtype} tensor of shape {tuple(noise.shape)}; "
                        "it must be floating point (K, C, g, g), one row per image")
    noise = noise.float()
    if not bool(torch.isfinite(noise).all()):
        raise DataError(f"--noise-file {path}: '{name}' holds NaN or inf; write finite noise")
    return noise


def start_noise(mode: str, seed: int, noise_file: Path | None = None) -> StartNoise:
    """The source ``--noise MODE`` / ``--noise-file`` name (the file wins; naming both differently is an error)."""
    from scale_rae_core.errors import ConfigError

    if mode not in NOISE_MODES:
        raise ConfigError(f"--noise '{mode}' is unknown; choose one of {', '.join(NOISE_MODES)} (or pass --noise-file)")
    if noise_file is not None:
        if mode != "seed":
            raise ConfigError(f"--noise {mode} and --noise-file both name the start noise; pass one of them")
        return FileNoise(noise_file)
    return ReferenceNoise(seed) if mode == "reference" else SeedNoise()
