"""Where inference models come from: a local directory or a Hugging Face repo, in our layout or the released one.

A model is named by ``--model``: a local directory, or a hub repo id with an optional pinned revision
(``nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B@<commit|tag|branch>``). Hub repos are fetched with
``huggingface_hub.snapshot_download`` (weights, configs and tokenizer files only); ``HF_HUB_OFFLINE=1`` is
respected, and a repo missing from the local cache then fails in one line saying how to get it.

Two layouts load:

* **srae export** (``config.json`` with ``"format": "srae-scale-rae"``, ``model.safetensors``, tokenizer, optional
  ``latent_stats.safetensors``), written by ``srae train stage1|stage2``: :func:`scale_rae_core.models.scale_rae.load_export`.
* **released** (``nyu-visionx/Scale-RAE-*``): a ``cambrian_qwen`` ``config.json`` (the Qwen2 fields plus
  ``mm_vision_tower_aux_list``, ``mm_hidden_size``, ``diffusion_model_{hidden_size,depth,heads,z_channels,channels}``,
  ...), safetensors weights (one file or shards + ``model.safetensors.index.json``) under the reference names, and
  the Qwen tokenizer with ``<im_start>``/``<im_end>``. Keys map with ``models.llm.from_reference_key`` (LLM,
  projector, latent queries, condition projector) and ``models.dit.REFERENCE_DIT_PREFIX`` (the head). Loading is
  strict: a key that maps nowhere, a missing key or a wrong shape is an error. Only ``lm_head.weight`` (tied to the
  input embeddings when ``tie_word_embeddings``) and the DiT's fixed tables (2-D sin-cos positions, RoPE, which are
  recomputed) may be absent.

Every loaded model and decoder carries a :class:`Source` whose ``revision`` goes into the manifests: the hub commit
hash, or for a local directory a content hash (sha256 over every file; files over 256 MiB contribute their size and
their first and last MiB, so hashing a multi-GB checkpoint stays instant).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.config import EncoderSettings
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.decoder import Decoder
from scale_rae_core.models.scale_rae import ScaleRAE, ScaleRAEConfig

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
DECODER_FILES = ["config.json", "model.pt", "model.safetensors"]
RELEASED_INDEX = "model.safetensors.index.json"
FULL_HASH_LIMIT = 256 << 20  # files above this are fingerprinted by size + first/last MiB
_SAMPLE = 1 << 20

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
# Sources: local directory or hub snapshot
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    spec: str  # what the user passed (`--model` / `--decoder`)
    path: Path  # the local directory holding the files
    repo_id: str | None  # hub repo, None for a local directory
    revision: str  # hub commit hash, or "sha256:<hex>" content hash of a local directory

    def describe(self) -> dict[str, Any]:
        return {"id": self.repo_id or str(self.path), "revision": self.revision, "path": str(self.path)}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def split_revision(spec: str) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); anything else -> (spec, None)."""
    if "@" in spec and not Path(spec).expanduser().exists():
        name, _, rev = spec.rpartition("@")
        if name and rev:
            return name, rev
    return spec, None


def _looks_like_repo(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def directory_hash(path: Path) -> str:
    """Content hash of every file under ``path`` (names included); see the module docstring for big files."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # hidden bookkeeping (e.g. .cache/) is not content
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
            else:
                digest.update(f.read(_SAMPLE))
                f.seek(size - _SAMPLE)
                digest.update(f.read(_SAMPLE))
    return "sha256:" + digest.hexdigest()[:20]


def resolve_source(spec: str, *, flag: str, allow_patterns: list[str]) -> Source:
    """A local directory (as is) or a hub repo id (``@rev`` pins a revision) fetched into the HF cache."""
    name, revision = split_revision(spec)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{flag} {spec}: is a file; pass the model directory that contains it")
        return Source(spec, local, None, directory_hash(local))
    if not _looks_like_repo(name):
        raise CheckpointError(f"{flag} {spec}: no such directory, and not a Hugging Face repo id (owner/name[@revision])")
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=allow_patterns, local_files_only=offline)
    except Exception as exc:  # hub errors have many types; each becomes one line
        pinned = f" --revision {revision}" if revision else ""
        if offline:
            raise CheckpointError(
                f"{flag} {spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it with "
                f"`huggingface-cli download {name}{pinned}` or unset HF_HUB_OFFLINE"
            ) from None
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointError(
            f"{flag} {spec}: cannot download from the Hugging Face hub ({type(exc).__name__}: {first}); check the "
            "repo id / revision and your network, or pass a local directory"
        ) from None
    folder_path = Path(folder)
    return Source(spec, folder_path, name, folder_path.name)  # snapshots/<commit hash>


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
        carried = self.source.path / BUNDLED_DECODER
        if (carried / "config.json").is_file():
            return str(carried)
        return DEFAULT_DECODERS.get(self.encoder.kind)


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


def load_model(spec: str, device: torch.device | str = "cpu", *, flag: str = "--model") -> LoadedModel:
    """Resolve ``spec`` and load it (either layout) in fp32, in eval mode, on ``device``."""
    from scale_rae_core.models.scale_rae import FORMAT, load_export

    source = resolve_source(spec, flag=flag, allow_patterns=MODEL_FILES)
    cfg_json = read_json(source.path / "config.json", flag)
    if cfg_json.get("format") == FORMAT:
        loaded = load_export(source.path, device=device)
        enc = loaded.encoder_settings()
        return LoadedModel(loaded.model, loaded.tokenizer, loaded.config, enc, source, "srae-export")
    if cfg_json.get("model_type") == "cambrian_qwen" or "mm_vision_tower_aux_list" in cfg_json:
        model, tokenizer, cfg, enc = load_released(source.path, cfg_json, flag=flag)
        return LoadedModel(model.to(device).eval(), tokenizer, cfg, enc, source, "released")
    raise CheckpointError(
        f"{flag} {spec}: config.json is neither an srae export (format '{FORMAT}') nor a released Scale-RAE model "
        "(model_type 'cambrian_qwen'); pass a Scale-RAE model"
    )


def encoder_from_tower(tower: str) -> EncoderSettings:
    """``mm_vision_tower_aux_list[0]`` (e.g. ``google/siglip2-so400m-patch14-224-interp256``) -> encoder section."""
    path = re.sub(r"(-interp\d+|-res\d+)+$", "", tower)
    low = path.lower()
    if "siglip" in low:
        return EncoderSettings(kind="siglip2", path=path)
    if "webssl" in low or "dino" in low:
        return EncoderSettings(kind="webssl-dino", path=path)
    raise CheckpointError(
        f"config.json mm_vision_tower_aux_list[0] = '{tower}' is not a SigLIP-2 or WebSSL-DINO tower; only those "
        "released encoders are supported"
    )


def released_config(hf: dict[str, Any], where: str = "config.json") -> tuple[ScaleRAEConfig, EncoderSettings]:
    """A released ``cambrian_qwen`` config.json -> our model config and its encoder."""
    from transformers import Qwen2Config

    from scale_rae_core.models.dit import DiTConfig
    from scale_rae_core.models.llm import UnifiedLMConfig

    def need(key: str) -> Any:
        if key not in hf:
            raise CheckpointError(f"{where}: key '{key}' is missing; this is not a released Scale-RAE query-mode model")
        return hf[key]

    if hf.get("vision_loss_mode", "query") != "query" or hf.get("vision_loss", "diffusion-loss") != "diffusion-loss":
        raise CheckpointError(
            f"{where}: vision_loss '{hf.get('vision_loss')}' / vision_loss_mode '{hf.get('vision_loss_mode')}' is not "
            "supported; only diffusion-loss in query mode (the released models) is"
        )
    if hf.get("dit_cls", "DiT") != "DiT":
        raise CheckpointError(f"{where}: dit_cls '{hf['dit_cls']}' is not supported; only LightningDiT ('DiT') is")
    if hf.get("diffusion_norm_stats_path"):
        raise CheckpointError(f"{where}: diffusion_norm_stats_path is set; models with head-internal normalisation are not supported")
    towers = need("mm_vision_tower_aux_list")
    if not isinstance(towers, list) or len(towers) != 1:
        raise CheckpointError(f"{where}: mm_vision_tower_aux_list must name exactly one encoder, got {towers!r}")
    encoder = encoder_from_tower(str(towers[0]))
    tokens = int((hf.get("mm_vision_tower_aux_token_len_list") or hf.get("vision_tower_aux_token_len_list") or [256])[0])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{where}: {tokens} image tokens is not a square grid")
    channels = int(hf.get("diffusion_model_channels", hf.get("mm_hidden_size", 1152)))
    if int(hf.get("mm_hidden_size", channels)) != channels:
        raise CheckpointError(f"{where}: mm_hidden_size {hf['mm_hidden_size']} != diffusion_model_channels {channels}")
    z = int(need("diffusion_model_z_channels"))
    if z == 0:
        raise CheckpointError(f"{where}: diffusion_model_z_channels = 0 (no condition projector) is not supported")
    if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"{where}: mm_projector_type '{hf['mm_projector_type']}' is not supported; only mlp2x_gelu is")
    # Qwen2 fields; released configs predate transformers 5 and keep rope_theta at the top level
    qwen_keys = set(Qwen2Config().to_dict()) | {"rope_theta"}
    qwen_keys -= {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "rope_parameters"}
    # rope_scaling is left out: the reference forces it to None, which is the default
    llm = Qwen2Config(**{k: v for k, v in hf.items() if k in qwen_keys}).to_dict()
    dit = DiTConfig(
        in_channels=channels,
        grid=grid,
        hidden=int(need("diffusion_model_hidden_size")),
        depth=int(need("diffusion_model_depth")),
        heads=int(need("diffusion_model_heads")),
        cond_dim=z,
        class_dropout_prob=float(hf.get("diffusion_class_dropout_prob", 0.1)),
    )
    lm = UnifiedLMConfig(encoder_channels=channels, num_image_tokens=tokens, z_channels=z)
    cfg = ScaleRAEConfig(
        llm=llm, lm=lm, dit=dit, shift_base_dim=int(hf.get("diffusion_base_dim") or 4096),
        encoder={"kind": encoder.kind, "path": encoder.path, "input_size": None, "hidden_size": channels, "num_tokens": tokens},
    )
    return cfg, encoder


def released_to_srae_key(key: str) -> str | None:
    """A released checkpoint key -> our ``ScaleRAE`` key (None: not part of the model)."""
    from scale_rae_core.models.dit import REFERENCE_DIT_PREFIX
    from scale_rae_core.models.llm import from_reference_key

    if key.startswith(REFERENCE_DIT_PREFIX):
        return "diff_head." + key[len(REFERENCE_DIT_PREFIX):]
    ours = from_reference_key(key)
    return None if ours is None else "lm." + ours


def srae_to_released_key(key: str) -> str:
    """Inverse of :func:`released_to_srae_key` (for writing the released layout)."""
    from scale_rae_core.models.dit import REFERENCE_DIT_PREFIX
    from scale_rae_core.models.llm import to_reference_key

    if key.startswith("diff_head."):
        return REFERENCE_DIT_PREFIX + key[len("diff_head."):]
    if key.startswith("lm."):
        return to_reference_key(key[len("lm."):])
    raise KeyError(f"{key} is not a ScaleRAE parameter name")


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
            raise CheckpointError(f"{index} names {missing[0]} but it is missing; re-download the model (huggingface-cli download)")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or {RELEASED_INDEX}; pass a released Scale-RAE model directory")


# The DiT's fixed tables: recomputed, so a checkpoint may omit them.
_RECOMPUTED = ("diff_head.pos_embed", "diff_head.feat_rope.freqs_cos", "diff_head.feat_rope.freqs_sin")


def load_released(path: Path, hf: dict[str, Any], *, flag: str = "--model") -> tuple[ScaleRAE, Any, ScaleRAEConfig, EncoderSettings]:
    """Build the model from a released config.json and copy the weights in, shard by shard (strict)."""
    from safetensors import SafetensorError, safe_open
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
    with torch.device("meta"):
        model = ScaleRAE(cfg)
    model.to_empty(device="cpu")
    own = model.state_dict()
    seen: set[str] = set()
    unaccounted: list[str] = []
    wrong: list[str] = []
    with torch.no_grad():
        for file in weight_files(path):
            try:
                with safe_open(str(file), framework="pt") as st:
                    for key in st.keys():
                        ours = released_to_srae_key(key)
                        if ours is None or ours not in own:
                            unaccounted.append(key)
                            continue
                        tensor = st.get_tensor(key)
                        if tuple(tensor.shape) != tuple(own[ours].shape):
                            wrong.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[ours].shape)}")
                            continue
                        own[ours].copy_(tensor)
                        seen.add(ours)
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(f"{file}: cannot read the weights ({exc}); re-download the model") from None
    optional = set(_RECOMPUTED)
    if cfg.llm.get("tie_word_embeddings"):
        optional.add("lm.llm.lm_head.weight")
    missing = sorted(set(own) - seen - optional)
    if unaccounted or missing or wrong:
        parts = [f"{label} {items[:3]}{' …' if len(items) > 3 else ''}" for label, items in
                 (("unknown keys", unaccounted), ("missing keys", missing), ("wrong shapes", wrong)) if items]
        raise CheckpointError(f"{path}: weights do not match config.json ({'; '.join(parts)}); re-download the model")
    if "lm.llm.lm_head.weight" not in seen:
        model.lm.llm.tie_weights()
    model.diff_head.reset_fixed_buffers()
    rotary = model.lm.llm.model.rotary_emb  # non-persistent inv_freq was left empty by to_empty
    model.lm.llm.model.rotary_emb = type(rotary)(model.lm.llm.config)
    return model, tokenizer, cfg, encoder


# ----------------------------------------------------------------------------------------------------
# The pixel decoder
# ----------------------------------------------------------------------------------------------------


def load_pixel_decoder(spec: str, encoder: EncoderSettings, device: torch.device | str = "cpu") -> tuple[Decoder, Source]:
    """``--decoder``: our decoder directory (``srae train decoder``) or a released one (``model.pt``), local or hub."""
    from scale_rae_core.models.convert import RELEASED_DECODERS, load_released_decoder
    from scale_rae_core.models.decoder import FORMAT as DECODER_FORMAT
    from scale_rae_core.models.decoder import load_decoder

    source = resolve_source(spec, flag="--decoder", allow_patterns=DECODER_FILES)
    cfg_path = source.path / "config.json"
    fmt = read_json(cfg_path, "--decoder").get("format") if cfg_path.is_file() else None
    if fmt == DECODER_FORMAT:
        decoder = load_decoder(source.path)
    elif (source.path / "model.pt").is_file():
        known = RELEASED_DECODERS.get(source.repo_id or "", {})
        decoder = load_released_decoder(
            source.path,
            encoder_kind=known.get("encoder_kind", encoder.kind),
            encoder_id=known.get("encoder_id", encoder.path),
        )
    else:
        raise CheckpointError(
            f"--decoder {spec}: neither an srae decoder (config.json + model.safetensors) nor a released one (model.pt); "
            "pass a decoder directory or repo id"
        )
    return decoder.to(device).eval(), source
