"""The inference session shared by `generate`, `understand`, `latent` and `scale`: device, precision, model,
decoder, encoder, the flow sampler over the head, pixel decoding and the manifest fields every output carries.

    profile ──> backend (device) + dtype ──> load_model(--model) ──> ScaleRAE (LLM + projectors + DiT) on device
                                             load_pixel_decoder(--decoder)   (lazily, on the same device)
                                             build_encoder(model's encoder)   (lazily, on the same device)

A :class:`Session` owns the backend it opened (under torchrun that is the process group) and closes it:
``with Session.open(model, profile) as session: ...``.

Precision: ``dtype`` (``--dtype``, else ``backend.weights_dtype``, else ``backend.precision``) is the dtype the model,
the decoder and the encoder are loaded and held in — fp32, bf16 or fp16, on CPU and CUDA alike; there is no
autocast. What precision needs stays float32 inside the modules: RMSNorm / LayerNorm normalise in float32, the
DiT's timestep embedder and fixed tables are float32, its per-token condition is formed in float32, and the
sampler's state x stays float32 (the noise is float32, every step is computed in float32: ``FlowSampler.step``);
the head is called on x cast to the weights' dtype and its velocity is promoted back.

Noise: by default image k's initial noise (and, for the SDE samplers, every step's noise) is drawn on the CPU from
``torch.Generator().manual_seed(seed_k)`` and then moved to the device (``flow.sampler.PerSampleNoise``), so an
image depends only on its own seed — not on the batch it was sampled in, nor on the device's random generator.
``--noise reference`` draws it as the released CLI does and ``--noise-file`` reads it (:mod:`.noise`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch

from scale_rae_core.backends.base import Backend
from scale_rae_core.config import Profile
from scale_rae_core.errors import BackendError, ConfigError
from scale_rae_core.flow.guidance import Guidance
from scale_rae_core.flow.sampler import SamplerConfig
from scale_rae_core.infer.loading import LoadedModel, Source, load_model, load_pixel_decoder
from scale_rae_core.models.decoder import Decoder
from scale_rae_core.models.dit import grid_to_tokens
from scale_rae_core.models.io import DTYPES
from scale_rae_core.models.rae import to_pixels
from scale_rae_core.version import __version__

if TYPE_CHECKING:
    from PIL import Image

    from scale_rae_core.infer.noise import StartNoise


@dataclass(frozen=True)
class SamplerSettings:
    """How the head turns conditions into latents (every number is checked here, whoever passes it)."""

    steps: int = 50
    guidance: float = 1.0  # w in v_u + w·(v_c − v_u); 1 runs the conditional branch only
    interval: tuple[float, float] | None = None  # guide only where lo ≤ t ≤ hi (conditional velocity elsewhere)
    method: str = "euler"  # one of flow.sampler.SAMPLERS (euler | heun | reference | sde | ...)

    def __post_init__(self) -> None:
        self.sampler_config()  # the method and the number of steps
        self.guidance_config()  # the guidance weight and interval

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(self.method, self.steps)

    def guidance_config(self) -> Guidance:
        """Classifier-free guidance with the head's null condition (w = 1: none)."""
        return Guidance("cfg", self.guidance, self.interval or (0.0, 1.0))

    def describe(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "guidance": self.guidance,
            "guidance_interval": list(self.interval) if self.interval else None,
            "sampler": self.method,
        }


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """``"0.1,0.9"`` -> (0.1, 0.9); None/"" -> None."""
    if not text:
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--guidance-interval '{text}' is not lo,hi (two numbers, e.g. 0.1,0.9)") from None
    return lo, hi


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: str  # "fp32" | "bf16" | "fp16": what the weights are held in

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """No autocast: the weights are held in :attr:`dtype` and run in it, with their float32 parts (norms, the
        timestep embedder, the fixed tables) kept float32 — autocast would run those in half too."""
        return contextlib.nullcontext()


def open_backend(profile: Profile, dtype: str | None) -> tuple[Backend, Runtime]:
    """The profile's backend (cpu or cuda; the caller closes it) and the runtime: its device and the weights'
    dtype (``--dtype``, else the profile's ``backend.weights_dtype`` / ``backend.precision``)."""
    from scale_rae_core.backends import get_backend

    if profile.backend.kind == "xla":
        raise BackendError(
            f"{profile.source}: backend.kind = 'xla'; inference runs on cpu or cuda, use --profile tiny-cpu or gpu-1"
        )
    dtype = dtype or profile.inference_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype '{dtype}' is unknown; use {', '.join(DTYPES)}")
    backend = get_backend(profile.backend)
    return backend, Runtime(backend.device, dtype)


def seconds_since(start: float) -> float:
    return round(time.perf_counter() - start, 4)


@dataclass
class Session:
    """A loaded model (plus lazily loaded decoder and encoder) and where and how it runs.

    :meth:`open` opens the profile's backend and the session owns it: :meth:`close` (or leaving a ``with``
    block) closes it. A session built directly from a :class:`Runtime` (tests, benchmarks) owns none.
    """

    loaded: LoadedModel
    runtime: Runtime
    profile: Profile
    decoder_spec: str | None = None  # --decoder
    load_seconds: float = 0.0
    backend: Backend | None = field(default=None, repr=False)  # owned: closed by close()
    _decoder: tuple[Decoder, Source] | None = field(default=None, repr=False)
    _encoder: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, model: str, profile: Profile, *, dtype: str | None = None, decoder: str | None = None) -> Session:
        backend, runtime = open_backend(profile, dtype)
        start = time.perf_counter()
        try:
            loaded = load_model(model, runtime.device, dtype=runtime.torch_dtype)
        except BaseException:
            backend.close()
            raise
        return cls(loaded, runtime, profile, decoder_spec=decoder, load_seconds=seconds_since(start), backend=backend)

    def close(self) -> None:
        """Close the backend this session opened (a no-op for one it does not own, or a second time)."""
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.backend is not None:  # the backend's own exit: under torchrun a clean end waits for every rank
            backend, self.backend = self.backend, None
            backend.__exit__(*exc)

    @property
    def model(self) -> Any:  # ScaleRAE
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    # ---- components loaded on demand ---------------------------------------------------------------

    def decoder(self) -> tuple[Decoder, Source]:
        """``--decoder``, else the released decoder for the model's encoder, else ``model.decoder.path``."""
        if self._decoder is None:
            spec = self.decoder_spec or self.loaded.default_decoder or self.profile.model.decoder.path
            if not spec:
                raise ConfigError(
                    f"no pixel decoder for {self.loaded.source.spec}: pass --decoder DIR_OR_REPO (a `srae train decoder` "
                    "output or a released decoder) or set model.decoder.path in the profile"
                )
            start = time.perf_counter()
            self._decoder = load_pixel_decoder(spec, self.loaded.encoder, self.runtime.device, self.runtime.torch_dtype)
            self.load_seconds += seconds_since(start)
            check_decoder(self._decoder[0], self.loaded.config.lm.num_image_tokens, self.loaded.config.lm.encoder_channels, spec)
        return self._decoder

    def encoder(self) -> Any:  # FrozenEncoder on the model's device
        if self._encoder is None:
            from scale_rae_core.models.build import build_encoder
            from scale_rae_core.models.io import cast_weights

            start = time.perf_counter()
            encoder = cast_weights(build_encoder(self.loaded.encoder).to(self.runtime.device), self.runtime.torch_dtype)
            self.load_seconds += seconds_since(start)
            lm = self.loaded.config.lm
            if (encoder.num_tokens, encoder.hidden_size) != (lm.num_image_tokens, lm.encoder_channels):
                raise ConfigError(
                    f"encoder {self.loaded.encoder.path} gives {encoder.num_tokens} × {encoder.hidden_size} tokens but the "
                    f"model reads {lm.num_image_tokens} × {lm.encoder_channels}; the model's config names the wrong encoder"
                )
            self._encoder = encoder
        return self._encoder

    # ---- shared steps --------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, conditions: torch.Tensor, seeds: list[int], settings: SamplerSettings,
               noise: StartNoise | None = None) -> torch.Tensor:
        """Conditions (B, N, Z) -> encoder-space latent tokens (B, N, C) on the CPU, float32 (``noise``: see
        :func:`sample_latents`)."""
        return sample_latents(self.model, conditions, seeds, settings, self.runtime, noise)

    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder-space tokens (B, N, C) -> images (B, 3, H, W) in [0, 1] on the CPU."""
        return decode_pixels(self.decoder()[0], tokens, self.runtime)

    def encoder_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images (any size and mode) -> (B, 3, S, S) in [0, 1] at the encoder's input size, as in training."""
        from scale_rae_core.data.images import square_pixels

        size = self.encoder().input_size
        return torch.stack([square_pixels(im, size) for im in images])

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> encoder tokens (B, N, C) on the device, float32."""
        return self.encoder()(pixels.to(self.runtime.device)).float()

    def base_manifest(self, mode: str) -> dict[str, Any]:
        """The fields every manifest starts with."""
        manifest: dict[str, Any] = {
            "mode": mode,
            "srae_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": {**self.loaded.source.describe(), "layout": self.loaded.layout},
            "encoder": {"kind": self.loaded.encoder.kind, "path": self.loaded.encoder.path},
            "device": str(self.runtime.device),
            "dtype": self.runtime.dtype,
        }
        if self._decoder is not None:
            manifest["decoder"] = self._decoder[1].describe()
        return manifest


def check_decoder(decoder: Decoder, tokens: int, channels: int, spec: str) -> None:
    if (decoder.cfg.num_patches, decoder.cfg.latent_dim) != (tokens, channels):
        raise ConfigError(
            f"--decoder {spec} reads {decoder.cfg.num_patches} × {decoder.cfg.latent_dim} latents but the model makes "
            f"{tokens} × {channels}; pass the decoder trained for the model's encoder"
        )


@torch.inference_mode()
def decode_pixels(decoder: Decoder, tokens: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Encoder-space tokens (B, N, C) -> images (B, 3, H, W) in [0, 1] on the CPU, through ``decoder`` (which casts
    them to its weights' dtype)."""
    x = decoder(tokens.to(runtime.device, torch.float32)).float()  # (B, 3, H, W), normalised pixels
    return to_pixels(x, decoder.cfg.pixel_mean, decoder.cfg.pixel_std).clamp(0, 1).cpu()


def check_guidable(model: Any, settings: SamplerSettings) -> None:
    """A head without a null condition (trained with class dropout 0) cannot be guided: one line saying why."""
    if settings.guidance_config().enabled and model.diff_head.null_condition(1) is None:
        raise ConfigError(
            f"--guidance {settings.guidance}: this model's head has no null condition (it was trained with "
            "class_dropout_prob 0, diffusion_class_dropout_prob = 0 in a released config.json), so classifier-free "
            "guidance has nothing to guide against; use --guidance 1"
        )


def sample_latents(
    model: Any, conditions: torch.Tensor, seeds: list[int], settings: SamplerSettings, runtime: Runtime,
    noise: StartNoise | None = None,
) -> torch.Tensor:
    """Run the flow head: conditions (B, N, Z) on the device -> de-normalised latent tokens (B, N, C) on the CPU.

    ``noise``: where the start noise comes from (:mod:`scale_rae_core.infer.noise`; default: each image's seed).
    One head forward per sampler step over B rows, or 2B rows [cond; null] where guidance acts (w != 1, t in the
    interval); the loop never reads a tensor value on the host. The sampler's state stays float32; the head runs
    in its weights' dtype.
    """
    from scale_rae_core.flow.sampler import FlowSampler
    from scale_rae_core.infer.noise import SeedNoise

    if len(seeds) != conditions.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {conditions.shape[0]} conditions")
    check_guidable(model, settings)
    dit = model.diff_head.cfg
    x1, step_noise = (noise or SeedNoise()).start(seeds, (dit.in_channels, dit.grid, dit.grid), runtime.device)
    null = model.diff_head.null_condition(1)  # (1, N, Z), broadcast over the batch; None for an unguidable head
    sampler = FlowSampler(settings.sampler_config(), shift=model.flow.shift)
    x = sampler.sample(model.diff_head, x1, conditions, guidance=settings.guidance_config(), null_cond=null,
                       step_noise=step_noise)  # (B, C, g, g), float32
    tokens = model.denormalize_latents(grid_to_tokens(x.float())).float().cpu()  # (B, N, C)
    if not torch.isfinite(tokens).all():
        raise ConfigError(
            f"the flow head produced NaN or infinite latents (guidance {settings.guidance}, {settings.steps} "
            f"{settings.method} steps); lower --guidance, or check the model's weights"
        )
    return tokens
