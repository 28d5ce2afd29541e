"""Where inference models come from: a local directory or a Hugging Face repo, in our layout or the released one.

A model is named by ``--model``: a local directory, or a hub repo id with an optional pinned revision
(``nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B@<commit|tag|branch>``), resolved by :mod:`scale_rae_core.hub` (weights,
configs and tokenizer files only); offline, a repo missing from the local cache fails in one line naming the
``hf download`` command that gets it.

Two layouts load:

* **srae export** (``config.json`` with ``"format": "srae-scale-rae"``, ``model.safetensors``, the LLM as a
  transformers folder in ``llm/`` — or, before version 2, all weights in ``model.safetensors`` and the tokenizer
  beside it —, optional ``latent_stats.safetensors``), written by ``srae train stage1|stage2``:
  :func:`scale_rae_core.models.scale_rae.load_export`. A model folder may carry its pixel decoder in ``decoder/``.
* **released** (``nyu-visionx/Scale-RAE-*``): a ``cambrian_qwen`` ``config.json`` (the Qwen2 fields plus
  ``mm_vision_tower_aux_list``, ``mm_hidden_size``, ``diffusion_model_{hidden_size,depth,heads,z_channels,channels}``,
  ...), safetensors weights (one file or shards + ``model.safetensors.index.json``) under the reference names, and
  the Qwen tokenizer with ``<im_start>``/``<im_end>``. Config and keys map with :mod:`scale_rae_core.models.adapters`.
  Loading is strict (:func:`scale_rae_core.models.scale_rae.load_scale_rae`): a key that maps nowhere, a missing key or a
  wrong shape is an error. Only ``lm_head.weight`` (tied to the input embeddings when ``tie_word_embeddings``; a
  stored one is then not used, as transformers does) and the DiT's fixed tables (2-D sin-cos positions, RoPE) may
  be absent; stored tables are used as stored, as the released code does (a warning names how far they are from
  the computed ones). ``diffusion_class_dropout_prob = 0`` loads a head without the null vector (not guidable) and
  ``mm_vision_select_layer`` picks the SigLIP hidden state the encoder returns (:mod:`~scale_rae_core.models.adapters`).

Precision: ``dtype`` (``--dtype`` / ``backend.weights_dtype``) is the dtype the weights are loaded and held in, on
the device directly: the model is built on the meta device, allocated once in that dtype and filled tensor by
tensor from the files (no float32 copy of a half-precision model exists at any point).

Every loaded model and decoder carries a :class:`Source` whose ``revision`` goes into the manifests: the hub commit
hash, or for a local directory a content hash (sha256 over every file; files over 256 MiB contribute their size,
modification time and first and last MiB, so hashing a multi-GB checkpoint stays instant and new weights written at
the same path still change it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.config import EncoderSettings
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.hub import Source, resolve
from scale_rae_core.models.adapters import released_config, released_to_srae_key
from scale_rae_core.models.decoder import Decoder
from scale_rae_core.models.io import read_safetensors
from scale_rae_core.models.scale_rae import ScaleRAE, ScaleRAEConfig, load_scale_rae

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]
RELEASED_INDEX = "model.safetensors.index.json"

# Released decoders by the encoder they read (the default `--decoder` for a released model).
DEFAULT_DECODERS = {"siglip2": "nyu-visionx/siglip2_decoder", "webssl-dino": "nyu-visionx/webssl300m_decoder"}
# A model directory may carry its own pixel decoder here (`srae demo` writes one); it is the default `--decoder`.
BUNDLED_DECODER = "decoder"
# The shapes demo model that ships inside the package (see BENCHMARKS.md), the default `--model`.
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-demo"


def bundled_model() -> Path | None:
    """The shapes demo model shipped with the package, or None in a checkout or wheel without it."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "config.json").is_file() else None


# ----------------------------------------------------------------------------------------------------
# The unified model
# ----------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: ScaleRAE
    tokenizer: Any  # PreTrainedTokenizerBase
    config: ScaleRAEConfig
    encoder: EncoderSettings  # the frozen encoder the model reads (for `understand`)
    source: Source
    layout: str  # "srae-export" | "released"

    @property
    def default_decoder(self) -> str | None:
        """The decoder the model directory carries (``decoder/``), else the released one for its encoder."""
        return carried_decoder(self.source.path) or DEFAULT_DECODERS.get(self.encoder.kind)


def carried_decoder(model: str | Path | None) -> str | None:
    """``MODEL/decoder`` when ``model`` is a local model directory that carries its pixel decoder, else None."""
    if not model:
        return None
    carried = Path(model).expanduser() / BUNDLED_DECODER
    return str(carried) if (carried / "config.json").is_file() else None


def read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{flag}: {path} is missing; pass a Scale-RAE model directory (srae export or released)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{flag}: {path} is unreadable ({exc}); re-download or re-export the model") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{flag}: {path} is not a JSON object; re-download or re-export the model")
    return data


def load_model(spec: str, device: torch.device | str = "cpu", *, flag: str = "--model",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve ``spec`` and load it (either layout) in eval mode, its weights in ``dtype`` on ``device``."""
    from scale_rae_core.models.scale_rae import FORMAT, load_export

    source = resolve(spec, flag=flag, allow_patterns=MODEL_FILES)
    cfg_json = read_json(source.path / "config.json", flag)
    if cfg_json.get("format") == FORMAT:
        loaded = load_export(source.path, device=device, dtype=dtype)
        enc = loaded.encoder_settings()
        return LoadedModel(loaded.model, loaded.tokenizer, loaded.config, enc, source, "srae-export")
    if cfg_json.get("model_type") == "cambrian_qwen" or "mm_vision_tower_aux_list" in cfg_json:
        model, tokenizer, cfg, enc = load_released(source.path, cfg_json, flag=flag, device=device, dtype=dtype)
        return LoadedModel(model.eval(), tokenizer, cfg, enc, source, "released")
    raise CheckpointError(
        f"{flag} {spec}: config.json is neither an srae export (format '{FORMAT}') nor a released Scale-RAE model "
        "(model_type 'cambrian_qwen'); pass a Scale-RAE model"
    )


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a released model: the shards named by the index, else model.safetensors."""
    index = path / RELEASED_INDEX
    if index.is_file():
        data = read_json(index, str(path))
        names = sorted(set((data.get("weight_map") or {}).values()))
        if not names:
            raise CheckpointError(f"{index}: weight_map is empty; re-download the model")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names {missing[0]} but it is missing; re-download the model")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or {RELEASED_INDEX}; pass a released Scale-RAE model directory")


def load_released(
    path: Path, hf: dict[str, Any], *, flag: str = "--model", device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[ScaleRAE, Any, ScaleRAEConfig, EncoderSettings]:
    """Build the model from a released config.json and copy the weights in, shard by shard (strict), in ``dtype``
    on ``device``; stored DiT tables are kept (see the module docstring)."""
    from transformers import AutoTokenizer, Qwen2Config

    from scale_rae_core.models.llm import image_token_ids

    cfg, encoder = released_config(hf, str(path / "config.json"))
    try:
        # config= keeps AutoTokenizer from parsing the cambrian_qwen config.json (an unknown model type)
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=Qwen2Config.from_dict(cfg.llm))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{flag}: {path} has no usable tokenizer ({type(exc).__name__}); re-download the model") from None
    try:
        image_token_ids(tokenizer)
    except ConfigError:
        raise CheckpointError(f"{flag}: the tokenizer in {path} lacks <im_start>/<im_end>; this is not a Scale-RAE tokenizer") from None
    fix = "re-download the model"
    model = load_scale_rae(cfg, read_safetensors(weight_files(path), fix=fix), source=str(path), fix=fix,
                           rename=released_to_srae_key, device=device, dtype=dtype, keep_stored_tables=True)
    return model, tokenizer, cfg, encoder


# ----------------------------------------------------------------------------------------------------
# The pixel decoder
# ----------------------------------------------------------------------------------------------------


def load_pixel_decoder(spec: str, encoder: EncoderSettings, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> tuple[Decoder, Source]:
    """``--decoder``: our decoder directory (``srae train decoder``) or a released one (``model.pt``), local or hub,
    its weights cast to ``dtype`` (LayerNorms normalise in float32, the position table stays float32)."""
    from scale_rae_core.models.convert import load_any_decoder
    from scale_rae_core.models.io import cast_weights

    decoder, source = load_any_decoder(spec, flag="--decoder", encoder_kind=encoder.kind, encoder_id=encoder.path)
    return cast_weights(decoder.to(device), dtype).eval(), source
