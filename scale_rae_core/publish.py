"""`srae push`: publish a trained model to the Hugging Face hub with a generated model card.

    srae push RUN_OR_EXPORT owner/name [--private] [--revision BRANCH] [--dry-run]

What goes up: the export (``RUN/export`` of a training run, or an export / model folder as it is: weights,
``llm/``, tokenizer, latent statistics, a carried ``decoder/``, ``ABOUT.json``), plus ``README.md`` — the folder's
own if it has one, else a card written from what the folder and its run know: the architecture (config.json), the
recipe (``RUN/profile.json``, the stage from ``RUN/events.jsonl``, the last training metrics, ``ABOUT.json``'s
commands), benchmark numbers (``ABOUT.json``) and how to run it with srae, the Python API and transformers. A run's
resolved profile goes up too, as ``training_profile.json``.

The upload is one commit: the files are staged as links in a temporary folder (nothing is written into the model
folder, so its content hash stays) and sent with ``HfApi.upload_folder`` after ``HfApi.create_repo`` (and
``create_branch`` for ``--revision``). ``--dry-run`` lists the files and prints the card without any network.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale_rae_core.errors import CheckpointError, ConfigError, SraeError

CARD = "README.md"
ABOUT = "ABOUT.json"
RUN_PROFILE = "training_profile.json"  # RUN/profile.json, as uploaded


@dataclass
class Publication:
    folder: Path  # the model folder that goes up
    repo_id: str
    card: str  # README.md
    files: dict[str, Path] = field(default_factory=dict)  # path in the repo -> local file (README.md excluded)
    url: str | None = None  # the commit, after a real push

    def listing(self) -> list[tuple[str, int]]:
        """(path in the repo, bytes) of every file that goes up, README.md included, sorted."""
        sizes = {name: path.stat().st_size for name, path in self.files.items()}
        sizes[CARD] = len(self.card.encode())
        return sorted(sizes.items())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _model_folder(path: Path) -> tuple[Path, Path | None]:
    """(the folder to upload, the run it came from or None)."""
    from scale_rae_core.models.scale_rae import is_export

    if is_export(path):
        run = path.parent if (path.parent / "profile.json").is_file() else None
        return path, run
    if (path / "export").is_dir() and is_export(path / "export"):
        return path / "export", path
    if (path / "profile.json").is_file():
        raise CheckpointError(f"{path}: the run has no export/ yet; finish training (checkpoint.export = true) or pass an export folder")
    raise CheckpointError(f"{path}: neither a training run with export/ nor an srae export (config.json + model.safetensors); "
                          "pass the --out folder of `srae train stage1|stage2` or an export folder")


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` but hidden ones (temporary folders of an interrupted write, .DS_Store, ...)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out[rel] = p
    return out


def prepare(path: str | Path, repo_id: str) -> Publication:
    """What :func:`push` would upload, with its card; offline."""
    from scale_rae_core.hub import is_repo_id

    if not is_repo_id(repo_id):
        raise ConfigError(f"REPO '{repo_id}' is not a hub repo id; pass owner/name (e.g. your-name/scale-rae-shapes)")
    path = Path(path).expanduser()
    folder, run = _model_folder(path)
    files = _files(folder)
    files.pop(CARD, None)
    profile = _read_json(run / "profile.json") if run is not None else {}
    if profile:
        files[RUN_PROFILE] = run / "profile.json"  # type: ignore[operator]
    card = (folder / CARD).read_text(encoding="utf-8") if (folder / CARD).is_file() else \
        model_card(folder, repo_id, profile=profile, run=run, files=sorted(files))
    return Publication(folder, repo_id, card, files)


def push(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False, token: str | None = None) -> Publication:
    """Upload a run's export (or an export / model folder) to ``repo_id`` in one commit; ``dry_run`` only prepares."""
    from scale_rae_core.hub import hub_offline

    publication = prepare(path, repo_id)
    if dry_run:
        return publication
    if hub_offline():
        raise ConfigError("srae push: HF_HUB_OFFLINE is set; unset it to upload, or use --dry-run to see what would go up")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        with tempfile.TemporaryDirectory() as staging:
            _stage(publication, Path(staging))
            commit = api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="model", revision=revision,
                                       commit_message=f"Upload {publication.folder.name} with srae push")
    except SraeError:
        raise
    except Exception as exc:  # hub errors have many types (auth, network, permissions); each becomes one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"srae push {repo_id}: the hub refused ({type(exc).__name__}: {first}); log in with "
                              "`hf auth login` (or set HF_TOKEN) and check the repo name and your rights to it") from None
    publication.url = str(getattr(commit, "commit_url", commit))
    return publication


def _stage(publication: Publication, staging: Path) -> None:
    """Links to every file (copies where links cannot be made) and the card, laid out as in the repo."""
    import shutil

    for name, src in publication.files.items():
        dest = staging / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(src.resolve(), dest)
        except OSError:
            shutil.copyfile(src, dest)
    (staging / CARD).write_text(publication.card, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------


def _stage_name(run: Path | None) -> str | None:
    """The stage (stage1 / stage2) the run's events say it trained last."""
    stage = None
    events = run / "events.jsonl" if run is not None else None
    if events is not None and events.is_file():
        for line in events.read_text(encoding="utf-8", errors="replace").splitlines():
            name = str(_loads(line).get("event", ""))
            if name.endswith(".done") and name.split(".")[0] in ("stage1", "stage2"):
                stage = name.split(".")[0]
    return stage


def _loads(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _recipe(profile: dict[str, Any], run: Path | None, about: dict[str, Any]) -> list[str]:
    lines = []
    stage = _stage_name(run)
    if profile:
        model, backend = profile.get("model", {}), profile.get("backend", {})
        enc, llm, dit = model.get("encoder", {}), model.get("llm", {}), model.get("dit", {})
        lines += [
            f"- Encoder (frozen): `{enc.get('kind')}` `{enc.get('path')}` at {enc.get('input_size') or 'its own'} px",
            f"- LLM: `{llm.get('path') or 'preset ' + str(llm.get('preset'))}`; DiT head: preset `{dit.get('preset')}`",
            f"- Data: `{profile.get('data', {}).get('train') or 'given with --data'}`; latent statistics: "
            f"`{model.get('stats') or 'none'}`",
            f"- Backend: {backend.get('kind')}, {backend.get('precision')}, "
            f"{backend.get('nodes')} node(s) x {backend.get('procs_per_node')} process(es); seed {profile.get('run', {}).get('seed')}",
        ]
        for name in [stage] if stage else ["stage1", "stage2"]:
            s = profile.get(name, {})
            keys = ("steps", "global_batch_size", "lr", "head_lr", "flow_weight", "words_weight", "seq_len", "warmup_ratio")
            lines.append(f"- `{name}`: " + ", ".join(f"{k} {s[k]}" for k in keys if k in s and (k != "words_weight" or s[k])))
    metrics = run / "metrics.jsonl" if run is not None else None
    if metrics is not None and metrics.is_file():
        last = next((_loads(x) for x in reversed(metrics.read_text(encoding="utf-8").splitlines()) if _loads(x)), {})
        shown = {k: v for k, v in last.items() if k in ("step", "loss", "ce", "flow", "words") and isinstance(v, (int, float))}
        if shown:
            lines.append("- Last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    made_by = about.get("made_by")
    made_by = [made_by] if isinstance(made_by, str) else made_by  # one command (srae demo --install) or several
    if isinstance(made_by, list) and made_by:
        lines += [*([""] if lines else []), "How it was made (ABOUT.json):", "", "```bash", *map(str, made_by), "```"]
    return lines


def _benchmarks(about: dict[str, Any]) -> list[str]:
    """A table per dict of numbers in ABOUT.json whose key names a benchmark (e.g. ``shapes_benchmark``)."""
    lines = []
    for key, value in about.items():
        if "bench" in key and isinstance(value, dict) and not key.endswith("_settings"):
            numbers = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                lines += [f"`{key}`" + (f" ({_settings(about.get(key + '_settings'))})" if about.get(key + "_settings") else ""),
                          "", "| metric | value |", "|---|---:|", *(f"| {k} | {v:.4g} |" for k, v in numbers.items()), ""]
    return lines


def _settings(settings: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) if isinstance(settings, dict) else str(settings)


def model_card(folder: Path, repo_id: str, *, profile: dict[str, Any], run: Path | None, files: list[str]) -> str:
    """README.md for the hub: front matter, model, recipe, benchmarks, how to run it, files."""
    from scale_rae_core.models.scale_rae import LLM_DIR, read_export_config

    cfg = read_export_config(folder)
    about = _read_json(folder / ABOUT)
    llm, dit, enc = cfg.llm, cfg.dit, cfg.encoder
    decoder = _read_json(folder / "decoder" / "config.json")
    side = int(decoder.get("patch_size", 0)) * math.isqrt(int(decoder.get("num_patches", 0)))
    decoder_line = (f"a pixel decoder in `decoder/` ({decoder.get('num_layers')} layers x {decoder.get('hidden_size')}, "
                    f"{side} px)" if decoder else "no pixel decoder (pass one with `--decoder`)")
    lines = [
        "---", "library_name: srae", "pipeline_tag: text-to-image",
        "tags:", "- srae", "- scale-rae", "- text-to-image", "- image-to-text", "---", "",
        f"# {repo_id.split('/')[1]}", "",
        "A Scale-RAE model trained with srae: a Qwen2 LLM that reads images through a projector and writes them "
        "through latent queries and a LightningDiT flow head, in the latent space of a frozen representation encoder.",
        "", "## Model", "",
        f"- LLM: Qwen2, {llm.get('num_hidden_layers')} layers x {llm.get('hidden_size')}, vocabulary {llm.get('vocab_size')}",
        f"- Diffusion head: LightningDiT, {dit.depth} blocks x {dit.hidden}, {dit.heads} heads",
        f"- Latents: `{enc.get('kind')}` encoder `{enc.get('path')}`, {dit.grid} x {dit.grid} tokens x {dit.in_channels} channels"
        + ("; normalised with the latent statistics in `latent_stats.safetensors`" if "latent_stats.safetensors" in files else ""),
        f"- Pixels: {decoder_line}", "",
    ]
    recipe = _recipe(profile, run, about)
    if recipe:
        lines += ["## Recipe", "", *recipe, ""]
    bench = _benchmarks(about)
    if bench:
        lines += ["## Benchmarks", "", *bench]
    lines += [
        "## Use it", "", "With the srae command line (`pip install srae`):", "", "```bash",
        f"srae generate \"Generate an image of a red circle on the left.\" --model {repo_id}",
        f"srae understand photo.png \"What is in the image?\" --model {repo_id}", "```", "",
        "From Python:", "", "```python", "from scale_rae_core import Pipeline", "",
        f"pipe = Pipeline.from_pretrained(\"{repo_id}\")",
        "image = pipe.generate(\"Generate an image of a red circle on the left.\")[0]",
        "print(pipe.understand(image, \"What is in the image?\"))", "```", "",
    ]
    if f"{LLM_DIR}/config.json" in files:
        lines += ["The LLM alone is a standard transformers Qwen2 model (image tokens included):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"llm = AutoModelForCausalLM.from_pretrained(\"{repo_id}\", subfolder=\"{LLM_DIR}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\", subfolder=\"{LLM_DIR}\")", "```", ""]
    lines += ["## Files", "", *(f"- `{name}`" for name in files), ""]
    return "\n".join(lines)
