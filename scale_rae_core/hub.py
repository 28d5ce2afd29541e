"""Where weights come from: a local file or directory, or a Hugging Face hub repo ``owner/name[@revision]``.

Every model, decoder, encoder, discriminator, scorer and tokenizer path srae reads goes through :func:`resolve`,
so all of them accept the same spellings and fail the same way:

* a path that exists is used as it is (``~`` expanded);
* ``owner/name`` or ``owner/name@<commit|tag|branch>`` is fetched with ``huggingface_hub.snapshot_download``
  (only the files a caller asks for) into the usual Hugging Face cache;
* anything else is an error naming the flag.

Offline mode is huggingface_hub's own setting (``huggingface_hub.constants.HF_HUB_OFFLINE``: ``HF_HUB_OFFLINE``
or ``TRANSFORMERS_OFFLINE`` set to 1/ON/YES/TRUE, any case; "0" or "false" leave it online). Offline, a repo
missing from the cache fails at once, in one line naming the ``hf download`` command that fetches it.

This is the bottom layer: it imports only ``errors`` and third-party packages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from scale_rae_core.errors import CheckpointError

# A transformers model folder: configs, safetensors weights, tokenizer and processor files.
TRANSFORMERS_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
# Older repos ship only PyTorch pickles; transformers reads those with weights_only=True.
PICKLED_WEIGHTS = ["pytorch_model*.bin"]
FULL_HASH_LIMIT = 256 << 20  # local files above this are fingerprinted by size, mtime and first/last MiB
_SAMPLE = 1 << 20


def hub_offline() -> bool:
    """huggingface_hub's offline setting, parsed the hub's way (read when huggingface_hub is imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_hint(repo: str, revision: str | None = None) -> str:
    """The command that puts ``repo`` into the local cache, in backquotes."""
    pinned = f" --revision {revision}" if revision else ""
    return f"`hf download {repo}{pinned}`"


def split_revision(spec: str) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); anything else (or an existing path) -> (spec, None)."""
    if "@" in spec and not Path(spec).expanduser().exists():
        name, _, rev = spec.rpartition("@")
        if name and rev:
            return name, rev
    return spec, None


def is_repo_id(name: str) -> bool:
    """``owner/name``: one slash, no empty part, not a relative or absolute path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def directory_hash(path: Path) -> str:
    """Content hash of every file under ``path`` (names included; hidden files skipped; big files sampled)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # hidden bookkeeping (e.g. .cache/) is not content
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
            else:  # sampled: the modification time too, so new weights written at the same path always count
                digest.update(f"{file.stat().st_mtime_ns}\0".encode())
                digest.update(f.read(_SAMPLE))
                f.seek(size - _SAMPLE)
                digest.update(f.read(_SAMPLE))
    return "sha256:" + digest.hexdigest()[:20]


@dataclass(frozen=True)
class Source:
    """Where one set of weights was found."""

    spec: str  # what the user passed
    path: Path  # the local file or directory holding it
    repo_id: str | None = None  # hub repo, None for a local path
    commit: str | None = None  # hub commit hash of the snapshot, None for a local path

    @cached_property
    def revision(self) -> str:
        """The hub commit hash, or for a local path a content hash (``sha256:<hex>``, computed on first use)."""
        return self.commit if self.commit is not None else directory_hash(self.path)

    def describe(self) -> dict[str, Any]:
        return {"id": self.repo_id or str(self.path), "revision": self.revision, "path": str(self.path)}


def resolve(
    spec: str,
    *,
    flag: str,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    files_ok: bool = False,
    hint: str = "",
) -> Source:
    """A local path as it is, else a hub snapshot of ``allow_patterns`` (under ``subfolder``) of repo ``spec``.

    ``flag`` names the setting in errors (``--model``, ``model.decoder.path``). ``revision`` pins the hub revision
    when ``spec`` carries no ``@rev``. ``files_ok``: a local file is accepted (else only a directory). ``hint`` ends
    the message when ``spec`` is neither a path nor a repo id.
    """
    name, pinned = split_revision(spec)
    revision = pinned or revision
    local = Path(name).expanduser()
    if local.exists():
        if local.is_file() and not files_ok:
            raise CheckpointError(f"{flag} {spec}: is a file; pass the directory that contains it")
        root = local / subfolder if subfolder and local.is_dir() else local
        return Source(spec, root)
    if not is_repo_id(name):
        tail = f"; {hint}" if hint else ""
        raise CheckpointError(
            f"{flag} {spec}: no such file or directory, and not a Hugging Face repo id (owner/name[@revision]){tail}"
        )
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = None if allow_patterns is None else [prefix + p for p in allow_patterns]
    offline = hub_offline()
    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # hub errors have many types; each becomes one line
        if offline:
            raise CheckpointError(
                f"{flag} {spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it with "
                f"{download_hint(name, revision)} or unset HF_HUB_OFFLINE"
            ) from None
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointError(
            f"{flag} {spec}: cannot download from the Hugging Face hub ({type(exc).__name__}: {first}); check the "
            f"repo id / revision and your network, or pass a local path (e.g. after {download_hint(name, revision)})"
        ) from None
    return Source(spec, folder / prefix if prefix else folder, name, folder.name)  # snapshots/<commit hash>


def resolve_transformers(spec: str, *, flag: str, revision: str | None = None, hint: str = "") -> Source:
    """A transformers model folder (``from_pretrained``-able): safetensors weights, else the pickled ones."""
    source = resolve(spec, flag=flag, allow_patterns=TRANSFORMERS_FILES, revision=revision, hint=hint)
    if source.repo_id is not None and not any(source.path.glob("*.safetensors")):
        source = resolve(spec, flag=flag, allow_patterns=TRANSFORMERS_FILES + PICKLED_WEIGHTS, revision=revision,
                         hint=hint)
    return source
