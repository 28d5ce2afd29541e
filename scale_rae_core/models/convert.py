"""Decoders from anywhere: ours (``srae train decoder``), released (RAE / Scale-RAE ``model.pt``) or diffusers'
``AutoencoderRAE``, local or hub; and decoders written back out, ours or as an ``AutoencoderRAE``.

A released decoder is a plain ``state_dict`` of the reference ``GeneralDecoder`` saved as ``model.pt``, usually
next to a Hugging Face ``vit_mae`` ``config.json`` (``nyu-visionx/siglip2_decoder``,
``nyu-visionx/webssl300m_decoder``); RAE-collections ships only ``model.pt`` (its config is a ViT-XL json).
An ``AutoencoderRAE`` (diffusers >= 0.42, e.g. ``nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08``) is a config.json with
``_class_name: "AutoencoderRAE"`` + ``diffusion_pytorch_model.safetensors``: its decoder and latent statistics are
read (its encoder is srae's own frozen encoder of the same kind). The key maps and the sizes rules live in
:mod:`scale_rae_core.models.adapters` (rae_decoder, diffusers_rae). Loading is strict: any missing or extra key is an error. Reading an
AutoencoderRAE needs no diffusers; diffusers loads what :func:`save_diffusers_rae` writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.files import read_plain_state_dict
from scale_rae_core.hub import Source, resolve
from scale_rae_core.models.adapters.diffusers_rae import (
    DIFFUSERS_CLASS,
    DIFFUSERS_LN_EPS,
    DIFFUSERS_VERSION,
    SRAE_TO_DIFFUSERS_ENCODER,
    diffusers_decoder_config,
    diffusers_decoder_to_srae,
    diffusers_latent_stats,
    diffusers_pos_embed,
    is_diffusers_rae_config,
    released_to_diffusers_key,
    srae_decoder_to_diffusers,
    srae_stats_to_diffusers,
)
from scale_rae_core.models.adapters.rae_decoder import (
    RELEASED_DECODERS,
    check_released_decoder,
    released_decoder_keys,
    released_decoder_sizes,
    released_decoder_to_srae,
)
from scale_rae_core.models.decoder import FORMAT, Decoder, DecoderConfig, load_decoder, save_decoder
from scale_rae_core.models.encoder import FAMILIES
from scale_rae_core.models.io import key_mismatch, load_state, write_model_folder
from scale_rae_core.models.stats import LatentStats, load_stats

RELEASED_WEIGHTS = "model.pt"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DECODER_FILES = ["config.json", RELEASED_WEIGHTS, "model.safetensors", "diffusion_pytorch_model*.safetensors",
                 DIFFUSERS_INDEX]
STATS_FILE = "latent_stats.safetensors"  # an srae decoder folder may carry the latent statistics it came with


def _config(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict; {} when there is none or it is not a JSON object."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_ours(path: Path) -> bool:
    return _config(path).get("format") == FORMAT


def is_diffusers_rae(path: Path) -> bool:
    """True for a folder holding a diffusers ``AutoencoderRAE`` (config.json ``_class_name``)."""
    return path.is_dir() and is_diffusers_rae_config(_config(path))


def load_any_decoder(spec: str, *, flag: str, encoder_kind: str, encoder_id: str = "",
                     revision: str | None = None) -> tuple[Decoder, Source]:
    """``spec`` = our decoder folder, a released one (folder, ``model.pt`` or hub repo id) or a diffusers
    AutoencoderRAE (folder or repo id), as a ``Decoder``.

    ``encoder_kind`` / ``encoder_id``: the encoder a released decoder reads, unless its repo is a known one
    (:data:`~scale_rae_core.models.adapters.rae_decoder.RELEASED_DECODERS`); an AutoencoderRAE names its encoder's kind itself.
    """
    source = resolve(spec, flag=flag, allow_patterns=DECODER_FILES, revision=revision, files_ok=True,
                     hint="train one with `srae train decoder` or convert a released one with `srae convert decoder`")
    if source.path.is_dir() and _is_ours(source.path):
        return load_decoder(source.path), source
    if is_diffusers_rae(source.path):
        return load_diffusers_rae(source.path, encoder_id=encoder_id)[0], source
    weights = source.path if source.path.is_file() else source.path / RELEASED_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{flag} {spec}: neither an srae decoder (config.json + model.safetensors), a released one "
            f"({RELEASED_WEIGHTS}) nor a diffusers AutoencoderRAE ({DIFFUSERS_WEIGHTS}); pass a decoder directory or repo id"
        )
    known = RELEASED_DECODERS.get(source.repo_id or "", {})
    decoder = _released(weights, _sibling_config(weights), known.get("encoder_kind", encoder_kind),
                        known.get("encoder_id", encoder_id))
    return decoder, source


def load_released_decoder(
    src: str | os.PathLike[str],
    *,
    encoder_kind: str | None = None,
    encoder_id: str | None = None,
    config: str | os.PathLike[str] | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    attn_impl: str = "sdpa",
) -> Decoder:
    """A released decoder (local ``model.pt`` / directory / hub repo id) as our ``Decoder``, loaded strictly.

    encoder_kind / encoder_id: the encoder the decoder reads; known released repos fill them in, otherwise
        ``encoder_kind`` is required (it fixes the pixel mean/std the output is de-normalised with).
    config: a ``vit_mae`` config.json to use when none sits next to model.pt.
    subfolder: path of the decoder inside a hub repo (RAE-collections: ``decoders/dinov2/wReg_base/ViTXL_n08``).
    """
    source = resolve(str(src), flag="decoder", allow_patterns=["config.json", RELEASED_WEIGHTS], revision=revision,
                     subfolder=subfolder, files_ok=True)
    return _released_at(source, str(src), encoder_kind, encoder_id, config, attn_impl)


def _released_at(source: Source, what: str, encoder_kind: str | None, encoder_id: str | None,
                 config: str | os.PathLike[str] | None, attn_impl: str = "sdpa") -> Decoder:
    weights = source.path if source.path.is_file() else source.path / RELEASED_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; a released decoder directory holds {RELEASED_WEIGHTS} (+ config.json)")
    known = RELEASED_DECODERS.get(source.repo_id or "", {})
    cfg_path = Path(config) if config is not None else _sibling_config(weights)
    return _released(weights, cfg_path, encoder_kind or known.get("encoder_kind"),
                     encoder_id or known.get("encoder_id", ""), attn_impl=attn_impl, what=what)


def _sibling_config(weights: Path) -> Path | None:
    cfg = weights.parent / "config.json"
    return cfg if cfg.is_file() else None


def _released(weights: Path, cfg_path: Path | None, kind: str | None, encoder_id: str, *,
              attn_impl: str = "sdpa", what: str = "") -> Decoder:
    hf: dict[str, Any] = {}
    if cfg_path is not None:
        try:
            hf = json.loads(Path(cfg_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable decoder config.json ({e})") from e
    if kind is None:
        raise ConfigError(
            f"{what or weights}: which encoder does this decoder read? pass encoder_kind= (one of {sorted(FAMILIES)})"
        )
    if kind not in FAMILIES:
        raise ConfigError(f"encoder_kind {kind!r} is unknown; use one of {sorted(FAMILIES)}")
    state = read_plain_state_dict(weights, fix="pass the decoder's own model.pt")
    num_layers = check_released_decoder(state, str(weights))
    cfg = DecoderConfig(
        **released_decoder_sizes(state, hf, str(weights), num_layers),
        attn_impl=attn_impl,
        encoder_kind=kind,
        encoder_id=encoder_id,
        pixel_mean=list(FAMILIES[kind].mean),
        pixel_std=list(FAMILIES[kind].std),
    )
    decoder = Decoder(cfg)
    fix = "pass the decoder's own model.pt"
    load_state(decoder, released_decoder_to_srae(state, str(weights)), source=str(weights), fix=fix,
               what="the decoder its sizes describe")
    return decoder


# ----------------------------------------------------------------------------------------------------
# diffusers AutoencoderRAE
# ----------------------------------------------------------------------------------------------------

# What AutoencoderRAE's `_build_encoder` builds per encoder_type: the transformers config class, its image_size,
# extra settings and the final norm whose affine it removes; every head is DIFFUSERS_HEAD_DIM wide.
DIFFUSERS_ENCODER_BUILD: dict[str, tuple[str, int, dict[str, Any], str]] = {
    "dinov2": ("Dinov2WithRegistersConfig", 518, {}, "layernorm."),
    "mae": ("ViTMAEConfig", 224, {"mask_ratio": 0.0}, "layernorm."),
}
DIFFUSERS_HEAD_DIM = 64
# encoder config fields that must equal what diffusers rebuilds (where the encoder's config has them)
DIFFUSERS_ENCODER_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mlp_ratio", "patch_size",
    "image_size", "num_channels", "layer_norm_eps", "hidden_act", "qkv_bias", "num_register_tokens",
    "use_swiglu_ffn", "layerscale_value",
)
_DIFFUSERS_FIX = "pass an AutoencoderRAE folder written by diffusers (save_pretrained) or srae"


def _diffusers_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The ``decoder.*`` and latent-statistics tensors of an AutoencoderRAE (one file or shards; ``encoder.*`` is
    not read)."""
    from safetensors import SafetensorError, safe_open

    index = folder / DIFFUSERS_INDEX
    names = sorted(set((_config_file(index).get("weight_map") or {}).values())) if index.is_file() else [DIFFUSERS_WEIGHTS]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; {_DIFFUSERS_FIX}")
        try:
            with safe_open(str(file), framework="pt") as st:
                for key in st.keys():
                    if key.startswith("decoder.") or key in ("_latents_mean", "_latents_std"):
                        out[key] = st.get_tensor(key)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{file}: cannot read the weights ({type(exc).__name__}); {_DIFFUSERS_FIX}") from None
    return out


def _config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); {_DIFFUSERS_FIX}") from None
    return data if isinstance(data, dict) else {}


def load_diffusers_rae(path: str | os.PathLike[str], *, encoder_id: str = "",
                       attn_impl: str = "sdpa") -> tuple[Decoder, LatentStats | None]:
    """A local AutoencoderRAE folder -> its decoder (strict) and latent statistics (None when they are the identity).

    ``encoder_id`` is recorded in the decoder's config (AutoencoderRAE names only the encoder's type)."""
    path = Path(path)
    hf = _config_file(path / "config.json")
    cfg = DecoderConfig(**diffusers_decoder_config(hf, str(path / "config.json")), encoder_id=encoder_id,
                        attn_impl=attn_impl)
    tensors = _diffusers_tensors(path)
    mean, std = tensors.pop("_latents_mean", None), tensors.pop("_latents_std", None)
    where = str(path / DIFFUSERS_WEIGHTS)
    expected = {released_to_diffusers_key(k) for k in released_decoder_keys(cfg.num_layers)} - {"decoder.decoder_pos_embed"}
    if set(tensors) != expected:
        raise CheckpointError(key_mismatch(where, "the AutoencoderRAE decoder its config.json describes", _DIFFUSERS_FIX,
                                           unknown=set(tensors) - expected, missing=expected - set(tensors)))
    decoder = Decoder(cfg)
    load_state(decoder, diffusers_decoder_to_srae(tensors, cfg.hidden_size, cfg.grid, where), source=where,
               fix=_DIFFUSERS_FIX, what="the decoder its config.json describes")
    if mean is None or std is None:
        raise CheckpointError(f"{where}: _latents_mean / _latents_std are missing; {_DIFFUSERS_FIX}")
    return decoder, diffusers_latent_stats(mean, std, hf, cfg.grid, cfg.latent_dim, where)


def _diffusers_encoder(etype: str, spec: str, cfg: DecoderConfig) -> tuple[dict[str, torch.Tensor], Any]:
    """The ``encoder.*`` tensors diffusers' AutoencoderRAE of ``etype`` needs, from the transformers encoder ``spec``
    (refused in one line when diffusers would rebuild the encoder differently); and the encoder's config."""
    import transformers

    from scale_rae_core.hub import resolve_transformers
    from scale_rae_core.models.tiny_encoder import TINY_RANDOM, tiny_random_encoder_dir

    cls_name, image_size, extra, final_norm = DIFFUSERS_ENCODER_BUILD[etype]
    folder = tiny_random_encoder_dir() if spec == TINY_RANDOM else resolve_transformers(spec, flag="--encoder-id").path
    model_cls = getattr(transformers, FAMILIES[cfg.encoder_kind].model_cls)
    try:
        backbone = model_cls.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--encoder-id {spec}: cannot load a {model_cls.__name__} ({type(exc).__name__}); pass the "
                              "encoder's transformers folder or repo id") from None
    src = backbone.config
    rebuilt = getattr(transformers, cls_name)(hidden_size=src.hidden_size, patch_size=src.patch_size, image_size=image_size,
                                              num_hidden_layers=src.num_hidden_layers,
                                              num_attention_heads=src.hidden_size // DIFFUSERS_HEAD_DIM, **extra)
    for name in DIFFUSERS_ENCODER_FIELDS:
        if hasattr(src, name) and hasattr(rebuilt, name) and getattr(src, name) != getattr(rebuilt, name):
            raise ConfigError(f"--encoder-id {spec}: {name} = {getattr(src, name)!r} but diffusers' AutoencoderRAE rebuilds "
                              f"its {etype} encoder with {getattr(rebuilt, name)!r}; it cannot hold this encoder")
    if src.hidden_size != cfg.latent_dim:
        raise ConfigError(f"--encoder-id {spec}: {src.hidden_size}-wide tokens but the decoder reads {cfg.latent_dim}; "
                          "pass the encoder the decoder was trained for")
    state = {f"encoder.{k}": v for k, v in backbone.state_dict().items() if not k.startswith(final_norm)}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in model_cls(rebuilt).state_dict().items() if not k.startswith(final_norm)}
    if {k[len("encoder."):]: tuple(v.shape) for k, v in state.items()} != shapes:
        raise ConfigError(f"--encoder-id {spec}: its weights differ in names or shapes from the {etype} encoder diffusers "
                          "rebuilds; it cannot hold this encoder")
    return state, src


def save_diffusers_rae(decoder: Decoder, out_dir: str | os.PathLike[str], *, encoder: str | None = None,
                       stats: LatentStats | None = None) -> Path:
    """Write ``decoder`` (+ ``stats``) as a diffusers AutoencoderRAE folder (config.json +
    diffusion_pytorch_model.safetensors, atomically), with the weights of ``encoder`` (a transformers folder or repo
    id; default: the decoder's ``encoder_id``). What AutoencoderRAE cannot represent is refused in one line."""
    cfg = decoder.cfg
    etype = SRAE_TO_DIFFUSERS_ENCODER.get(cfg.encoder_kind)
    if etype is None:
        raise ConfigError(f"--to diffusers: srae writes AutoencoderRAEs of {' and '.join(sorted(SRAE_TO_DIFFUSERS_ENCODER))} "
                          f"encoders only, not '{cfg.encoder_kind}' (diffusers has no such encoder_type, or, for siglip, "
                          "cannot build it with transformers 5)")
    if cfg.layer_norm_eps != DIFFUSERS_LN_EPS:
        raise ConfigError(f"--to diffusers: the decoder's layer_norm_eps is {cfg.layer_norm_eps}; AutoencoderRAE's is fixed at {DIFFUSERS_LN_EPS}")
    if not torch.allclose(decoder.pos_embed.detach().cpu(), diffusers_pos_embed(cfg.hidden_size, cfg.grid), rtol=0, atol=1e-6):
        raise ConfigError(f"--to diffusers: diffusers recomputes the decoder's position table, and for a {cfg.grid} x "
                          f"{cfg.grid} token grid its table differs from this decoder's; only 16 x 16 grids (or decoders "
                          "read from an AutoencoderRAE) convert")
    spec = encoder or cfg.encoder_id
    if not spec:
        raise ConfigError("--to diffusers: the decoder names no encoder; pass --encoder-id (the encoder's transformers "
                          "folder or repo id): an AutoencoderRAE holds the encoder's weights too")
    tensors, src = _diffusers_encoder(etype, spec, cfg)
    tensors |= srae_decoder_to_diffusers(decoder.state_dict())
    tensors["encoder_mean"] = torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
    tensors["encoder_std"] = torch.tensor(cfg.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
    mean, std = torch.zeros(1), torch.ones(1)
    if stats is not None:
        if stats.shape != (cfg.num_patches, cfg.latent_dim):
            raise ConfigError(f"--stats: shape {stats.shape} but the decoder reads ({cfg.num_patches}, {cfg.latent_dim}) tokens; "
                              "pass the statistics of this decoder's encoder")
        mean, std = srae_stats_to_diffusers(stats, cfg.grid)
    tensors["_latents_mean"], tensors["_latents_std"] = mean, std
    config = {
        "_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION, "encoder_type": etype,
        "encoder_hidden_size": cfg.latent_dim, "encoder_patch_size": int(src.patch_size),
        "encoder_num_hidden_layers": int(src.num_hidden_layers), "decoder_hidden_size": cfg.hidden_size,
        "decoder_num_hidden_layers": cfg.num_layers, "decoder_num_attention_heads": cfg.num_heads,
        "decoder_intermediate_size": cfg.mlp_size, "patch_size": cfg.patch_size,
        "encoder_input_size": cfg.grid * int(src.patch_size), "image_size": cfg.image_size, "num_channels": 3,
        "encoder_norm_mean": list(cfg.pixel_mean), "encoder_norm_std": list(cfg.pixel_std),
        # the buffers' shapes come from these lists when diffusers builds the model, so they are written in full
        "latents_mean": mean.tolist() if stats is not None else None,
        "latents_std": std.tolist() if stats is not None else None,
        "noise_tau": 0.0, "reshape_to_2d": True, "use_encoder_loss": False, "scaling_factor": 1.0,
    }
    return write_model_folder(out_dir, None, config, {DIFFUSERS_WEIGHTS: tensors})


# ----------------------------------------------------------------------------------------------------
# `srae convert decoder`
# ----------------------------------------------------------------------------------------------------

CONVERT_TARGETS = ("srae", "diffusers")


def read_decoder(src: str | os.PathLike[str], *, encoder_kind: str | None = None, encoder_id: str | None = None,
                 config: str | os.PathLike[str] | None = None, subfolder: str | None = None,
                 revision: str | None = None) -> tuple[Decoder, LatentStats | None]:
    """Any decoder ``src`` names (ours, released, AutoencoderRAE; local or hub) and the latent statistics it
    carries (an AutoencoderRAE's, or ``latent_stats.safetensors`` in our folder), else None."""
    source = resolve(str(src), flag="decoder", allow_patterns=DECODER_FILES, revision=revision, subfolder=subfolder,
                     files_ok=True)
    if source.path.is_dir() and _is_ours(source.path):
        stats = source.path / STATS_FILE
        return load_decoder(source.path), load_stats(stats) if stats.is_file() else None
    if is_diffusers_rae(source.path):
        return load_diffusers_rae(source.path, encoder_id=encoder_id or "")
    return _released_at(source, str(src), encoder_kind, encoder_id, config), None


def convert_decoder(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, to: str = "srae",
                    stats: str | os.PathLike[str] | None = None, **kwargs: Any) -> Path:
    """Read ``src`` (:func:`read_decoder`, ``kwargs`` are its options) and write it to ``out_dir`` as srae's format
    (config.json + model.safetensors, + latent_stats.safetensors when there are statistics) or as a diffusers
    AutoencoderRAE (``encoder_id`` names the encoder whose weights go with it). ``stats``: a statistics file to use
    instead of the ones ``src`` carries."""
    if to not in CONVERT_TARGETS:
        raise ConfigError(f"--to '{to}' is unknown; use one of {', '.join(CONVERT_TARGETS)}")
    decoder, carried = read_decoder(src, **kwargs)
    latent_stats = load_stats(stats) if stats else carried
    if to == "diffusers":
        return save_diffusers_rae(decoder, out_dir, encoder=kwargs.get("encoder_id"), stats=latent_stats)
    if latent_stats is None:
        return save_decoder(decoder, out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        return save_decoder(decoder, out_dir, extra_files={STATS_FILE: latent_stats.save(Path(tmp) / STATS_FILE)})
