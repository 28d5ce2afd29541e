"""The unified Scale-RAE model: a Qwen2 LLM with image interfaces (`UnifiedLM`) + a LightningDiT flow head.

    batch ──UnifiedLM──> CE over supervised text,  conditions (B·M, N, Z) at every image slot
                         │ answer images only
    clean encoder tokens (B·M, N, C) ─(normalise with latent stats)─> x₀ (R, C, g, g)
                         └─ flow matching: v̂ = diff_head(x_t, t, conditions) ─> per-image loss (R,)

    total = CE + flow_weight · mean(flow loss over answer images)       (reference §4.1, flow_weight 2.0)

A batch without any answer image contributes a flow term of exactly 0. The head still runs on one slot (with
weight 0) so every process of a sharded run executes the same modules (FSDP collectives stay matched).

Parameter names: ``lm.*`` (UnifiedLM: ``lm.llm.*``, ``lm.mm_projector.*``, ``lm.latent_queries``,
``lm.diff_head_projector.*``) and ``diff_head.*`` (the LightningDiT). Every name containing ``diff_head`` —
the head and its condition projector — is the reference's "head" parameter group (own lr and betas).

An export directory (:func:`write_export` / :func:`load_export`) is self-contained. Version 2 (written since the
LLM became a transformers folder)::

    EXPORT/config.json                 format ``srae-scale-rae``, version 2: image interface sizes, DiT config, flow
                                       shift base, the encoder to use (the LLM config is llm/config.json)
    EXPORT/model.safetensors           the image modules and the head (``lm.mm_projector.*``, ``lm.latent_queries``,
                                       ``lm.diff_head_projector.*``, ``diff_head.*``)
    EXPORT/llm/                        the LLM as a standard Qwen2 folder: config.json (``model_type: qwen2``),
                                       model.safetensors (``Qwen2ForCausalLM`` names), the tokenizer files
    EXPORT/latent_stats.safetensors    when targets were normalised

so ``AutoModelForCausalLM.from_pretrained("EXPORT/llm")`` and ``AutoTokenizer.from_pretrained("EXPORT/llm")`` load
the LLM (image tokens included) and no tensor is stored twice. ``EXPORT`` itself is not a transformers folder, and
transformers says so instead of building a default model: its config.json carries ``model_type: srae-scale-rae``
(``AutoConfig`` / ``AutoModel*`` raise "does not recognize this architecture") and a ``hidden_size`` that is a
sentence, not a number (``Qwen2ForCausalLM.from_pretrained`` and every other strict config class raise a validation
error quoting it). Version 1 (older exports, still loaded): ``model.safetensors`` holds every tensor, the Qwen2
config sits inline under ``llm`` in config.json and the tokenizer files sit beside it. :meth:`ScaleRAEConfig.to_json`
is that inline form, also what a run's ``RUN/model/config.json`` holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from scale_rae_core.config import DiTSettings, EncoderSettings, LLMSettings
from scale_rae_core.errors import CheckpointError
from scale_rae_core.files import check_format
from scale_rae_core.flow.transport import FlowMatching
from scale_rae_core.models.dit import DiTConfig, LightningDiT, tokens_to_grid
from scale_rae_core.models.io import (
    WEIGHTS_FILE,
    ExtraFile,
    cast_weights,
    export_model,
    load_state,
    read_safetensors,
    warn_if_differs,
)
from scale_rae_core.models.llm import UnifiedLM, UnifiedLMConfig
from scale_rae_core.models.stats import LatentStats, load_stats

if TYPE_CHECKING:
    from scale_rae_core.backends.base import Backend

FORMAT = "srae-scale-rae"
FORMAT_VERSION = 2  # the newest layout this srae reads
INLINE_VERSION = 1  # ScaleRAEConfig.to_json: the LLM config inline (version-1 exports, RUN/model)
EXPORT_VERSION = 2  # what write_export writes: the LLM in llm/
LLM_DIR = "llm"
LLM_PREFIX = "lm.llm."  # our names of the Qwen2ForCausalLM's tensors
NOT_TRANSFORMERS = (
    "not a transformers model: this is an srae Scale-RAE export; load it with srae "
    "(scale_rae_core.Pipeline.from_pretrained) or load its LLM from the llm/ folder inside it"
)
STATS_FILE = "latent_stats.safetensors"
HEAD_MARKER = "diff_head"  # parameters whose name contains this train with the head's lr and betas


@dataclass
class ScaleRAEConfig:
    """Everything needed to rebuild the network (no weights): what ``config.json`` of an export holds."""

    llm: dict[str, Any]  # Qwen2Config.to_dict() (vocab_size = len(tokenizer), image tokens included)
    lm: UnifiedLMConfig
    dit: DiTConfig
    shift_base_dim: int = 4096  # flow time shift s = sqrt(N · C / shift_base_dim)
    encoder: dict[str, Any] = field(default_factory=dict)  # kind, path, input_size (+ hidden_size, num_tokens)

    def to_json(self) -> dict[str, Any]:
        dit = asdict(self.dit)
        if dit["null_condition"]:  # the default: left out, so files keep the layout written before the key existed
            del dit["null_condition"]
        return {
            "format": FORMAT,
            "version": INLINE_VERSION,
            "llm": self.llm,
            "lm": asdict(self.lm),
            "dit": dit,
            "shift_base_dim": self.shift_base_dim,
            "encoder": self.encoder,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "config.json") -> ScaleRAEConfig:
        check_format(data, FORMAT, FORMAT_VERSION, where, "a Scale-RAE model config", "pass an srae export directory")
        try:
            return cls(
                llm=dict(data["llm"]),
                lm=UnifiedLMConfig(**data["lm"]),
                dit=DiTConfig(**data["dit"]),
                shift_base_dim=int(data["shift_base_dim"]),
                encoder=dict(data.get("encoder", {})),
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where} is incomplete or malformed ({exc}); re-export the model") from None


class UnifiedLoss(NamedTuple):
    total: torch.Tensor  # CE + flow_weight · flow
    ce: torch.Tensor  # mean over supervised next-token targets
    flow: torch.Tensor  # mean per-image flow loss over answer images (0 without any)
    answer_images: torch.Tensor  # how many answer images the flow term averaged over
    words: torch.Tensor  # mean prompt-words loss at the answer images' queries (0 when off)


class ScaleRAE(nn.Module):
    """UnifiedLM (Qwen2 + projector + latent queries + condition projector) with a LightningDiT head."""

    def __init__(self, cfg: ScaleRAEConfig, llm: PreTrainedModel | None = None, stats: LatentStats | None = None) -> None:
        super().__init__()
        if cfg.dit.cond_dim != cfg.lm.z_channels:
            raise CheckpointError(f"DiT cond_dim {cfg.dit.cond_dim} != condition projector width {cfg.lm.z_channels}; rebuild the config")
        if cfg.dit.num_tokens != cfg.lm.num_image_tokens or cfg.dit.in_channels != cfg.lm.encoder_channels:
            raise CheckpointError(
                f"DiT grid {cfg.dit.grid}² × {cfg.dit.in_channels} does not match the encoder's "
                f"{cfg.lm.num_image_tokens} × {cfg.lm.encoder_channels} tokens; rebuild the config"
            )
        self.cfg = cfg
        if llm is None:
            llm = Qwen2ForCausalLM(Qwen2Config.from_dict(cfg.llm))
        self.lm = UnifiedLM(cfg.lm, llm)
        self.diff_head = LightningDiT(cfg.dit)
        self.flow = FlowMatching.for_latents(cfg.dit.num_tokens, cfg.dit.in_channels, cfg.shift_base_dim)
        self.stats = stats  # targets are normalised with these; not a parameter

    def normalize_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Clean encoder tokens (..., N, C) → the head's target space."""
        return tokens if self.stats is None else self.stats.normalize(tokens.float())

    def denormalize_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head's output space (..., N, C) → encoder tokens (for the pixel decoder)."""
        return tokens if self.stats is None else self.stats.denormalize(tokens.float())

    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        flow_weight: float = 2.0,
        all_slots: bool = False,
        generator: torch.Generator | None = None,
        flow_repeats: int = 1,
        words_weight: float = 0.0,
    ) -> UnifiedLoss:
        """Loss of one collated batch (see :func:`scale_rae_core.models.llm.collate`).

        ``all_slots``: run the head on every image slot and mask (static shapes, for XLA); otherwise only on
        the answer images (or on one slot at weight 0 when there are none). Both give the same loss.
        ``generator`` (on the batch's device) fixes the flow times and noise, e.g. for evaluation.
        ``flow_repeats``: flow samples (own time and noise) per answer image, averaged into its loss; the LLM
        runs once, only the head sees the repeats (MAR's "diffusion batch multiplier").
        ``words_weight``: adds ``words_weight`` × :func:`prompt_words_loss` (not in the reference; 0 = off).
        """
        ce, conditions, hidden = self.lm(batch)  # conditions (B·M, N, Z)
        features = batch["image_features"].flatten(0, 1)  # (B·M, N, C)
        answer = batch["answer_image_mask"].flatten()  # (B·M,)
        if all_slots:
            rows = torch.arange(answer.numel(), device=answer.device)
            weight = answer.float()
        else:
            rows = answer.nonzero().squeeze(1)
            weight = torch.ones(rows.numel(), device=answer.device)
            if rows.numel() == 0:  # keep the head in the graph (matched collectives), contributing 0
                rows = torch.zeros(1, dtype=torch.long, device=answer.device)
                weight = torch.zeros(1, device=answer.device)
        x0 = tokens_to_grid(self.normalize_latents(features[rows]), self.cfg.dit.grid)  # (R, C, g, g)
        cond = conditions[rows]  # (R, N, Z)
        if flow_repeats > 1:
            x0, cond = x0.repeat_interleave(flow_repeats, 0), cond.repeat_interleave(flow_repeats, 0)
        per_image = self.flow.loss(self.diff_head, x0, cond, generator=generator)  # (R · repeats,)
        per_image = per_image.view(rows.numel(), flow_repeats).mean(1)  # (R,)
        n_answer = weight.sum()
        flow = (per_image * weight).sum() / n_answer.clamp(min=1.0)
        total = ce + flow_weight * flow
        if words_weight == 0:
            return UnifiedLoss(total, ce, flow, n_answer, torch.zeros_like(flow))
        words = (prompt_words_loss(self.lm, batch, hidden, rows) * weight).sum() / n_answer.clamp(min=1.0)
        return UnifiedLoss(total + words_weight * words, ce, flow, n_answer, words)


def prompt_words_loss(
    lm: UnifiedLM, batch: Mapping[str, torch.Tensor], hidden: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Per image slot (B·M,), or per slot in ``rows`` (R,): how well each of its N latent queries names the words
    written before it.

    The LM head reads every query's final hidden state; the loss is KL(words ‖ softmax(logits)) averaged over
    the N queries, where ``words`` is the frequency of each text token (not image, not padding) of the sample
    before the slot's first position. A random LLM otherwise learns to carry the prompt into the queries from
    the flow gradient alone, which is weak where an attribute is a small share of the latent variance (colour
    on an ImageNet CNN's tokens: 1.3%); this is a direct, low-variance signal for the same routing. Shapes are
    static for a fixed ``rows`` (XLA passes every slot and masks). Costs R·N·vocab logits.
    """
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["image_positions"]
    B, L = ids.shape
    _, M, N = positions.shape
    text = (mask > 0) & (ids >= 0)  # (B, L)
    before = torch.arange(L, device=ids.device)[None, None, :] < positions[..., :1]  # (B, M, L)
    weights = (text[:, None, :] & before).float()
    vocab = lm.llm.lm_head.out_features
    counts = torch.zeros(B, M, vocab, device=ids.device).scatter_add_(2, ids.clamp(min=0)[:, None, :].expand(B, M, L), weights)
    target = (counts / counts.sum(-1, keepdim=True).clamp(min=1.0)).flatten(0, 1)  # (B·M, V)
    index = positions.reshape(B, M * N, 1).expand(-1, -1, hidden.shape[-1])
    queries = hidden.gather(1, index).reshape(B * M, N, -1)
    if rows is not None:
        target, queries = target[rows], queries[rows]
    logp = torch.log_softmax(lm.llm.lm_head(queries).float(), dim=-1)  # (R, N, V)
    entropy = torch.special.xlogy(target, target).sum(-1)  # Σ p log p (≤ 0)
    return entropy - (logp * target[:, None, :]).sum(-1).mean(-1)


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters in the head group (the DiT and ``diff_head_projector``)."""
    return [n for n, _ in model.named_parameters() if HEAD_MARKER in n]


# ----------------------------------------------------------------------------------------------------
# Building from profile sections
# ----------------------------------------------------------------------------------------------------


def build_llm(settings: LLMSettings, tokenizer_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The LLM and its tokenizer (with ``<im_start>``/``<im_end>`` added), tokenizer files saved to ``tokenizer_dir``.

    ``path = ""``: a random ``Qwen2ForCausalLM`` from ``preset`` (seed torch first) with the tiny shapes-world
    tokenizer; otherwise ``Qwen2ForCausalLM.from_pretrained(path)`` in fp32 and its ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer

    from scale_rae_core.models.llm import add_image_tokens
    from scale_rae_core.models.presets import TINY_TOKENIZER, llm_config

    tokenizer_dir = Path(tokenizer_dir)
    if not settings.path:
        tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
        llm = Qwen2ForCausalLM(llm_config(settings.preset, vocab_size=len(tokenizer)))
    else:
        from scale_rae_core.hub import resolve_transformers

        local = str(resolve_transformers(settings.path, flag="model.llm.path").path)
        if is_export(local):
            raise CheckpointError(
                f"model.llm.path = '{settings.path}' is an srae export, not a Qwen2 folder; pass its LLM folder "
                f"{Path(settings.path) / LLM_DIR} (an older export without llm/: load_export it and save_export it again)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(local)
            llm = Qwen2ForCausalLM.from_pretrained(local, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"model.llm.path = '{settings.path}': cannot load a Qwen2 model and tokenizer ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}); pass a Qwen2 model folder or repo id"
            ) from None
    add_image_tokens(tokenizer, llm)
    tokenizer.save_pretrained(str(tokenizer_dir))
    return llm, tokenizer


def scale_rae_config(
    llm: PreTrainedModel, dit: DiTSettings, encoder: EncoderSettings, encoder_hidden: int, encoder_grid: int
) -> ScaleRAEConfig:
    """The model config for an LLM, the ``[model.dit]`` section and the encoder's token shape.

    The head is sized by ``dit.preset`` (width, depth, heads, condition width) with ``in_channels`` = the
    encoder's hidden size and its token grid.
    """
    from dataclasses import replace

    from scale_rae_core.errors import ConfigError
    from scale_rae_core.models.dit import DIT_PRESETS

    if dit.preset not in DIT_PRESETS:
        raise ConfigError(f"model.dit.preset = '{dit.preset}' is unknown; choose one of {', '.join(DIT_PRESETS)}")
    dit_cfg = replace(
        DIT_PRESETS[dit.preset], in_channels=encoder_hidden, grid=encoder_grid, class_dropout_prob=dit.class_dropout_prob
    )
    lm_cfg = UnifiedLMConfig(encoder_channels=encoder_hidden, num_image_tokens=encoder_grid**2, z_channels=dit_cfg.cond_dim)
    return ScaleRAEConfig(
        llm=llm.config.to_dict(),
        lm=lm_cfg,
        dit=dit_cfg,
        shift_base_dim=dit.shift_base_dim,
        encoder={"kind": encoder.kind, "path": encoder.path, "input_size": encoder.input_size,
                 "hidden_size": encoder_hidden, "num_tokens": encoder_grid**2,
                 **({"select_layer": encoder.select_layer} if encoder.select_layer != -1 else {})},
    )


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def export_config(cfg: ScaleRAEConfig) -> dict[str, Any]:
    """``config.json`` of a version-2 export: :meth:`ScaleRAEConfig.to_json` without the LLM config (it lives in
    ``llm/config.json``), plus the two keys that make transformers refuse the folder (see the module docstring)."""
    data = {k: v for k, v in cfg.to_json().items() if k != "llm"}
    return {**data, "version": EXPORT_VERSION, "model_type": FORMAT, "hidden_size": NOT_TRANSFORMERS}


def llm_config_text(cfg: ScaleRAEConfig) -> str:
    """``llm/config.json``: the Qwen2 config, loadable by ``AutoConfig`` / ``AutoModelForCausalLM``."""
    qwen = Qwen2Config.from_dict(cfg.llm)
    qwen.architectures = ["Qwen2ForCausalLM"]
    return qwen.to_json_string(use_diff=False)


def split_llm(state: Mapping[str, torch.Tensor], cfg: ScaleRAEConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our state dict -> (the image modules and head, our names; the ``Qwen2ForCausalLM`` state dict, its names).

    A tied ``lm_head.weight`` is left out of the LLM's (transformers ties it again on load, as srae does)."""
    rest = {k: v for k, v in state.items() if not k.startswith(LLM_PREFIX)}
    llm = {k[len(LLM_PREFIX):]: v for k, v in state.items() if k.startswith(LLM_PREFIX)}
    if cfg.llm.get("tie_word_embeddings"):
        llm.pop("lm_head.weight", None)
    return rest, llm


def write_export(
    out_dir: str | Path,
    state: Mapping[str, torch.Tensor],
    cfg: ScaleRAEConfig,
    tokenizer_dir: str | Path,
    stats_path: str | Path | None = None,
    *,
    backend: Backend | None = None,
) -> Path:
    """Write an export (version 2, see the module docstring) of full tensors ``state`` (our names), atomically.

    With a ``backend`` only the main rank writes and every rank waits at a barrier (*collective*, as
    :func:`~scale_rae_core.models.io.export_model`)."""
    tensors, llm = split_llm(state, cfg)
    files: dict[str, ExtraFile] = {
        f"{LLM_DIR}/{p.name}": p for p in sorted(Path(tokenizer_dir).iterdir()) if p.is_file()
    }
    files[f"{LLM_DIR}/config.json"] = llm_config_text(cfg)
    files[f"{LLM_DIR}/{WEIGHTS_FILE}"] = llm
    if stats_path:
        files[STATS_FILE] = Path(stats_path)
    return export_model(out_dir, tensors, export_config(cfg), files, backend=backend)


def save_export(model: ScaleRAE, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, stats_path: str | Path | None = None) -> Path:
    """Write a single-process (unsharded) model as an export directory; see :func:`load_export`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        return write_export(out_dir, model.state_dict(), model.cfg, tok_dir, stats_path)


# Tensors a checkpoint may omit: the DiT's fixed tables are recomputed after loading.
RECOMPUTED = ("diff_head.pos_embed", "diff_head.feat_rope.freqs_cos", "diff_head.feat_rope.freqs_sin")
LM_HEAD = "lm.llm.lm_head.weight"  # absent when tied to the input embeddings


def load_scale_rae(
    cfg: ScaleRAEConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    source: str,
    fix: str,
    stats: LatentStats | None = None,
    rename: Callable[[str], str | None] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_stored_tables: bool = False,
) -> ScaleRAE:
    """The unified model of ``cfg`` with ``tensors`` (our names, or ``rename``-d), train mode, its weights in
    ``dtype`` (:func:`cast_weights`: the DiT's tables and timestep embedder stay float32) on ``device``.

    The DiT's fixed tables (``pos_embed``, RoPE) are computed here, except with ``keep_stored_tables`` (the released
    layout, whose code uses the stored values): then tables the file stores are kept, with a warning naming the
    largest difference from the computed ones when they differ (a checkpoint that stored them in bf16, say). srae's
    own files store the tables it computed (fp16-rounded in a bundle written with ``half``): recomputing restores
    the exact ones. A tied config (``tie_word_embeddings``) ties ``lm_head`` to the input embeddings even when the
    file also stores an ``lm_head.weight`` (as transformers does), with a warning when that stored head differs.
    """
    with torch.device("meta"):
        model = ScaleRAE(cfg, stats=stats)
    cast_weights(model, dtype)
    model.to_empty(device=device)
    tied = bool(cfg.llm.get("tie_word_embeddings"))
    optional = set(RECOMPUTED) | ({LM_HEAD} if tied else set())
    filled = load_state(model, tensors, source=source, fix=fix, what="its config.json", rename=rename, optional=optional)
    llm = model.lm.llm
    if tied and LM_HEAD in filled:
        warn_if_differs(source, "the stored lm_head.weight", llm.lm_head.weight, "the input embeddings",
                         llm.model.embed_tokens.weight, "unused: the config ties the two (tie_word_embeddings)")
    llm.tie_weights()  # to_empty gave the tied head its own (empty) tensor; tied configs share it again
    stored = {n.removeprefix("diff_head.") for n in filled & set(RECOMPUTED)} if keep_stored_tables else set()
    own = model.diff_head.state_dict()
    for name, table in model.diff_head.fixed_tables().items():
        if name in stored:
            warn_if_differs(source, f"the stored DiT table {name}", own[name], "the computed one", table,
                             "the stored values are used, as the released code does")
    model.diff_head.reset_fixed_buffers(keep=stored)  # Fourier W, and the tables not kept from the file
    llm.model.rotary_emb = type(llm.model.rotary_emb)(llm.config).to(device)  # inv_freq is non-persistent
    return model


@dataclass
class LoadedExport:
    model: ScaleRAE
    tokenizer: PreTrainedTokenizerBase
    config: ScaleRAEConfig
    path: Path

    def encoder_settings(self) -> EncoderSettings:
        """The export's encoder as a profile section (``build_encoder(loaded.encoder_settings())``)."""
        return encoder_settings_of(self.config.encoder)


def encoder_settings_of(enc: dict[str, Any]) -> EncoderSettings:
    """A Scale-RAE config's ``encoder`` record as a profile section: every key that picks the latent space."""
    return EncoderSettings(kind=enc["kind"], path=enc["path"], input_size=enc.get("input_size"),
                           select_layer=int(enc.get("select_layer", -1)))


def is_export(path: str | Path) -> bool:
    """True for a directory with weights and a Scale-RAE ``config.json`` (either version)."""
    if not (Path(path) / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_json(where: Path) -> dict[str, Any]:
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: cannot read the model config ({exc}); pass an srae export directory") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: not a JSON object; pass an srae export directory")
    return data


def has_llm_folder(path: str | Path) -> bool:
    """True for a version-2 export (the LLM in ``llm/``)."""
    return (Path(path) / LLM_DIR / "config.json").is_file()


def read_export_config(path: str | Path) -> ScaleRAEConfig:
    """The config of an export (either version) or of a run's ``RUN/model`` folder (the inline form)."""
    path = Path(path)
    data = _read_json(path / "config.json")
    if data.get("format") == FORMAT and int(data.get("version", 0)) >= 2:
        if not has_llm_folder(path):
            raise CheckpointError(f"{path}: {LLM_DIR}/config.json is missing; a version-2 export keeps its LLM there, re-export the model")
        data = {**data, "llm": _read_json(path / LLM_DIR / "config.json")}
    return ScaleRAEConfig.from_json(data, str(path / "config.json"))


def export_tokenizer_dir(path: str | Path) -> Path:
    """Where an export's tokenizer files are: ``llm/`` (version 2) or the export itself (version 1)."""
    return Path(path) / LLM_DIR if has_llm_folder(path) else Path(path)


def tokenizer_files(folder: str | Path) -> dict[str, Path]:
    """The tokenizer files of a model folder (name -> path): every file but weights and model configs."""
    skip = {"config.json", "generation_config.json", "ABOUT.json", "README.md"}
    return {p.name: p for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.suffix != ".safetensors" and p.name not in skip and not p.name.endswith(".index.json")}


def read_export_tensors(path: str | Path, *, fix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an export under our names, one at a time: ``model.safetensors`` (all of a version-1 export;
    the image modules and head of a version-2 one), then ``llm/model.safetensors`` prefixed with ``lm.llm.``."""
    path = Path(path)
    yield from read_safetensors([path / WEIGHTS_FILE], fix=fix)
    if has_llm_folder(path):
        llm = path / LLM_DIR / WEIGHTS_FILE
        if not llm.is_file():
            raise CheckpointError(f"{llm}: missing; a version-2 export keeps its LLM weights there, {fix}")
        for key, value in read_safetensors([llm], fix=fix):
            yield LLM_PREFIX + key, value


def load_export(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedExport:
    """Load an export directory (either version) written by training or :func:`save_export`, eval mode, its weights
    in ``dtype`` on ``device`` (:func:`load_scale_rae`)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass an export written by `srae train stage1|stage2`")
    cfg = read_export_config(path)
    stats = load_stats(path / STATS_FILE) if (path / STATS_FILE).is_file() else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(export_tokenizer_dir(path)))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: the tokenizer files are missing or broken ({type(exc).__name__}); re-export the model") from None
    fix = "re-export the model"
    model = load_scale_rae(cfg, read_export_tensors(path, fix=fix), source=str(path), fix=fix, stats=stats,
                           device=device, dtype=dtype)
    return LoadedExport(model.eval(), tokenizer, cfg, path)
