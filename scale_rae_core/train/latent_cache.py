"""The latent space a class DiT learns, and an optional cache of it on disk (`srae latent cache`) for the DiT or
for the pixel decoder.

**Latent source.** `latent_source(profile)`: the frozen encoder, its pixel decoder and its latent statistics —
`[dit_training.encoder]`, `dit_training.decoder`, `dit_training.stats` where the profile sets them, else the
profile's `[model.encoder]`, `model.decoder.path`, `model.stats` (the GPU profiles keep Scale-RAE's SigLIP-2 in
`[model]` and give RAE's DINOv2-B to the DiT). `check_stats` refuses a statistics file made for another encoder
(the encoder it records) or of another latent shape, in one line.

**Cache.** `cache_latents` encodes a labelled dataset (class folders or packed classes) ONCE with the frozen
encoder (eval mode, fp32, the images centre-cropped to `dit_training.image_size`) and writes::

    CACHE/cache_plan.json            the settings the cache is being written with (a resume must match them)
    CACHE/latents-r00000-00000.safetensors   latents (n, N, C) [+ latents_flipped (n, N, C)], labels (n,), and
                                     the chunk's exact latent statistics (count, mean, M2; float64)
    CACHE/latent_stats.safetensors   exact statistics of every cached latent (flipped ones included), merged
                                     from the chunks: usable as dit_training.stats (it records the encoder)
    CACHE/latent_cache.json          written last: format, encoder, image size, latent shape, dtype, flips,
                                     classes, every chunk with its count (the dataset order)

**For the decoder** (`for_="decoder"`, `srae latent cache --for decoder`): the images of any dataset `srae train
decoder` reads (packed shards or an image folder, by `train.decoder_data.open_images`, centre crop to
`decoder_training.image_size`, each distinct image once per process) are encoded by `[model.encoder]`, and each
chunk also keeps the pixels (`pixels`, uint8 (n, 3, S, S)) as the decoder's targets, with no labels and no flips
(the decoder trainer does not flip). `srae train decoder --data CACHE` then trains without running the encoder:
the encoder is frozen and in eval mode, so its latents are the same every epoch (80 of the tiny decoder step's
114 MFLOP per image were that forward).

Each process (torchrun) takes a contiguous range of the dataset in file order and writes its chunks of
`chunk_size` images atomically, in order; a rerun skips the chunks already written (resume). With `hflip`, the
latents of the horizontally flipped image are stored too, so training keeps RAE's random flips without the
encoder. `LatentCache` reads it back as a resumable, per-epoch shuffled stream split across ranks, the same
contract as `data.labelled` streams; `open_cache` checks it was made by the expected encoder at the expected
image size and with labels inside the model's classes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.backends.base import Backend
from scale_rae_core.config import EncoderSettings, Profile
from scale_rae_core.data.order import EpochOrder
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.events import Reporter
from scale_rae_core.files import atomic_write, check_format
from scale_rae_core.train.decoder_data import FolderImages, ImageStream, Position, batches, open_images

CACHE_FORMAT = "srae-latent-cache"
CACHE_VERSION = 1
MANIFEST = "latent_cache.json"
PLAN = "cache_plan.json"
STATS = "latent_stats.safetensors"
PURPOSES = ("dit", "decoder")  # what a cache is for: `srae train dit` (labels, flips) or `srae train decoder` (pixels)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WRONG_PURPOSE = {  # a reader given a cache made for the other trainer
    "dit": "is a latent cache for srae train decoder (no labels); cache the class data with srae latent cache --for dit",
    "decoder": "is a latent cache without pixels (one for srae train dit); make one for the decoder with srae latent "
               "cache --for decoder",
}
OPEN_CHUNKS = 64  # chunk files a reader keeps open


# ---------------------------------------------------------------------------------------------------------
# The latent source
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentSource:
    encoder: EncoderSettings
    decoder: str  # "" = none recorded
    stats: str  # "" = no normalisation
    where: str  # the profile section the encoder came from, for error messages
    stats_key: str  # the profile key the statistics came from

    def encoder_record(self) -> dict[str, Any]:
        """How caches, stats checks and model folders identify the encoder."""
        return encoder_record(self.encoder)


def latent_source(profile: Profile) -> LatentSource:
    """`[dit_training]`'s encoder / decoder / stats where set, else `[model]`'s (see the module docstring)."""
    dt, m = profile.dit_training, profile.model
    return LatentSource(
        encoder=dt.encoder if dt.encoder is not None else m.encoder,
        decoder=dt.decoder if dt.decoder is not None else m.decoder.path,
        stats=dt.stats if dt.stats is not None else m.stats,
        where="dit_training" if dt.encoder is not None else "model",
        stats_key="dit_training.stats" if dt.stats is not None else "model.stats",
    )


def _encoder_names(settings: EncoderSettings) -> set[str]:
    """Every name a stats file may record for this encoder (its path; the generated folder of tiny-random)."""
    from scale_rae_core.models.build import TINY_RANDOM, tiny_random_encoder_dir

    names = {settings.path}
    if settings.path == TINY_RANDOM:
        names.add(str(tiny_random_encoder_dir()))
    return names


def check_stats(path: str | Path, source: LatentSource, tokens: int, channels: int, key: str) -> Any:
    """Load the latent statistics at `path` (ours or RAE's stat.pt) and refuse, in one line naming `key`, a file
    of another encoder (the encoder it records) or of another latent shape than (tokens, channels)."""
    from safetensors import safe_open

    from scale_rae_core.models.stats import load_stats

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key} = '{path}': file not found; compute it with `srae stat` or set it to ''")
    stats = load_stats(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        recorded, kind = meta.get("encoder"), meta.get("encoder_kind")
        if (recorded and recorded not in _encoder_names(source.encoder)) or (kind and kind != source.encoder.kind):
            raise ConfigError(
                f"{key} = '{path}' holds statistics of the encoder {recorded} ({kind}), not of "
                f"{source.encoder.path} ({source.encoder.kind}); run `srae stat` with this encoder"
            )
    if stats.shape != (tokens, channels):
        raise ConfigError(
            f"{key} = '{path}' holds statistics of {stats.shape[0]} × {stats.shape[1]} latents but the encoder "
            f"{source.encoder.path} gives {tokens} × {channels}; use the statistics of this encoder and image size"
        )
    return stats


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def _chunk_name(rank: int, index: int) -> str:
    return f"latents-r{rank:05d}-{index:05d}.safetensors"


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            changed = ", ".join(f"{k} {old.get(k)!r} (now {v!r})" for k, v in plan.items() if old.get(k) != v)
            raise ConfigError(
                f"--out {out} holds a cache written with other settings: {changed}; use a new --out or the same "
                "settings and process count to resume it"
            )


def _done_chunks(out: Path, rank: int) -> list[int]:
    """Counts of this rank's chunks already written, in order (the contiguous prefix that exists)."""
    from safetensors import safe_open

    counts = []
    while (path := out / _chunk_name(rank, len(counts))).is_file():
        with safe_open(str(path), framework="pt") as f:
            counts.append(int(f.get_slice("latents").get_shape()[0]))
    return counts


@torch.no_grad()
def cache_latents(profile: Profile, data: str | Path, out: str | Path, backend: Backend, *, chunk_size: int = 1000,
                  batch_size: int = 64, dtype: str = "float32", for_: str = "dit", reporter: Reporter | None = None
                  ) -> Path:
    """*Collective.* Encode the dataset at `data` into the cache folder `out` (`batch_size` images per encoder
    forward, `chunk_size` per file) for `for_` (one of `PURPOSES`, see the module docstring); returns the
    manifest path."""
    from scale_rae_core.models.build import build_encoder

    reporter = reporter or Reporter()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is unknown; choose one of {', '.join(DTYPES)}")
    if for_ not in PURPOSES:
        raise ConfigError(f"--for {for_} is unknown; choose one of {', '.join(PURPOSES)}")
    if chunk_size < 1 or batch_size < 1:
        raise ConfigError(f"--chunk-size and --batch-size must be >= 1, got {chunk_size} and {batch_size}")
    decoder = for_ == "decoder"
    settings = profile.model.encoder if decoder else latent_source(profile).encoder
    image_size = profile.decoder_training.image_size if decoder else profile.dit_training.image_size
    hflip = False if decoder else profile.dit_training.hflip
    out = Path(out).expanduser()
    plan = {"data": str(Path(data).expanduser().resolve()), "encoder": encoder_record(settings),
            "image_size": image_size, "hflip": hflip, "dtype": dtype, "chunk_size": chunk_size,
            "world_size": backend.num_processes}
    if decoder:  # (a DiT cache's plan keeps its old keys, so caches begun before this key existed still resume)
        plan["for"] = for_
    if (out / MANIFEST).is_file() and not (out / PLAN).is_file():
        raise ConfigError(f"--out {out} holds a finished cache of unknown settings; use a new --out")
    _check_plan(out, plan)
    stream, chunks = _cache_input(profile, data, image_size, backend, chunk_size, decoder)
    backend.barrier()
    if backend.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / PLAN, plan)
    backend.barrier()

    encoder = build_encoder(settings).to(backend.device).eval()
    done = _done_chunks(out, backend.rank)
    index, to_dtype = len(done), DTYPES[dtype]
    # A packed conversations dataset repeats each image once per sample: its distinct images are not known ahead.
    total = None if decoder and not isinstance(stream, FolderImages) else stream.images_per_epoch
    with reporter.task("latent cache", total) as advance:
        advance(sum(done))
        for pixels, labels in chunks(done):
            tensors = {"latents": _encode(encoder, pixels, batch_size, backend.device, to_dtype)}
            if decoder:
                tensors["pixels"] = (pixels * 255).round().to(torch.uint8)  # exact: the reader's pixels are k / 255
            else:
                tensors["labels"] = labels
            if hflip:
                tensors["latents_flipped"] = _encode(encoder, pixels.flip(-1), batch_size, backend.device, to_dtype)
            tensors.update(_chunk_stats([v for k, v in tensors.items() if k.startswith("latents")]))
            path = out / _chunk_name(backend.rank, index)
            atomic_write(path, lambda tmp, t=tensors: _save(t, tmp))
            index += 1
            advance(len(pixels))
    backend.barrier()
    if backend.is_main:
        _write_manifest(out, plan, stream, encoder, for_)
    backend.barrier()
    return out / MANIFEST


def encoder_record(settings: EncoderSettings) -> dict[str, Any]:
    """How caches, stats checks and model folders identify an encoder (``select_layer`` when it is not the last
    layer: records written before it was kept still match their encoder)."""
    record: dict[str, Any] = {"kind": settings.kind, "path": settings.path, "input_size": settings.input_size}
    if settings.select_layer != -1:
        record["select_layer"] = settings.select_layer
    return record


def _cache_input(profile: Profile, data: str | Path, image_size: int, backend: Backend, chunk_size: int,
                 decoder: bool) -> tuple[Any, Any]:
    """This process's stream of the dataset (opened, so checked, before anything is written) and a function of the
    chunks already written (their counts) that iterates the remaining chunks of (pixels (n, 3, S, S), labels (n,)
    or None)."""
    rank, world = backend.rank, backend.num_processes
    if decoder:
        images = open_images(data, image_size=image_size, train=False, rank=rank, world_size=world,
                             seed=profile.run.seed, unique=True)

        def image_chunks(done: list[int]):
            # Unique images have no position to seek to: the written chunks are read again (not encoded) and passed.
            for i, (x, _) in enumerate(batches(images, chunk_size)):
                if i >= len(done):
                    yield x, None
        return images, image_chunks
    from scale_rae_core.data.labelled import labelled_batches, open_labelled

    labelled = open_labelled(data, image_size=image_size, train=False, num_classes=profile.dit_training.num_classes,
                             rank=rank, world_size=world, drop_last=False)

    def labelled_chunks(done: list[int]):
        labelled.skip(sum(done))
        return ((x, y) for x, y, _ in labelled_batches(labelled, chunk_size))
    return labelled, labelled_chunks


def _encode(encoder: Any, pixels: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Encoder tokens (n, N, C) of pixels (n, 3, S, S), `batch_size` images per forward, on the CPU in `dtype`."""
    parts = [encoder(x.to(device)).to(dtype).cpu() for x in pixels.split(batch_size)]
    return torch.cat(parts).contiguous()


def _chunk_stats(latents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact statistics of a chunk's latents as tensors: stat_count (1,), stat_mean / stat_m2 (N, C) float64."""
    from scale_rae_core.models.stats import RunningStats

    acc = RunningStats()
    for z in latents:
        acc.update(z.float())
    assert acc.mean is not None and acc.m2 is not None
    return {"stat_count": torch.tensor([acc.count]), "stat_mean": acc.mean, "stat_m2": acc.m2}


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": CACHE_FORMAT})


def _write_manifest(out: Path, plan: dict[str, Any], stream: Any, encoder: Any, for_: str) -> None:
    """Every rank's chunks in rank order (the dataset's file order), with the latent shape and the classes."""
    from safetensors import safe_open

    from scale_rae_core.models.stats import RunningStats

    chunks, max_label, stats = [], -1, RunningStats()
    for rank in range(plan["world_size"]):
        for i, count in enumerate(_done_chunks(out, rank)):
            name = _chunk_name(rank, i)
            part = RunningStats()
            with safe_open(str(out / name), framework="pt") as f:
                if "labels" in f.keys():
                    max_label = max(max_label, int(f.get_tensor("labels").max()))
                part.count, part.mean, part.m2 = (int(f.get_tensor("stat_count")[0]), f.get_tensor("stat_mean"),
                                                  f.get_tensor("stat_m2"))
            stats.merge(part)
            chunks.append({"file": name, "count": count})
    enc = plan["encoder"]
    stats.result().save(out / STATS, metadata={"encoder": enc["path"], "encoder_kind": enc["kind"],
                                                "input_size": str(encoder.input_size), "data": plan["data"]})
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "encoder": plan["encoder"],
        "image_size": plan["image_size"], "latent_shape": [encoder.num_tokens, encoder.hidden_size],
        "grid": encoder.grid[0], "dtype": plan["dtype"], "hflip": plan["hflip"],
        "for": for_, "pixels": for_ == "decoder",
        "classes": getattr(stream, "classes", None), "num_classes": getattr(stream, "num_classes", 0),
        "max_label": max_label,
        "total": sum(c["count"] for c in chunks), "chunks": chunks, "data": plan["data"],
    }
    _write_json(out / MANIFEST, manifest)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def is_cache(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return (path / MANIFEST).is_file() or (path.is_file() and path.name == MANIFEST)


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(cache folder, manifest); one-line error for anything that is not a finished srae latent cache."""
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"--data {folder}: no readable {MANIFEST} ({type(exc).__name__}); finish it with srae latent cache") from None
    check_format(manifest, CACHE_FORMAT, CACHE_VERSION, f"--data {folder}: {MANIFEST}", "an srae latent cache",
                 "write one with srae latent cache", DataError)
    return folder, manifest


def check_purpose(manifest: dict[str, Any], where: Path, purpose: str) -> None:
    """One-line error for a cache made for the other trainer (`PURPOSES`)."""
    if manifest.get("for", "dit") != purpose:
        raise ConfigError(f"--data {where} " + WRONG_PURPOSE[purpose])


def check_origin(manifest: dict[str, Any], where: Path, encoder: dict[str, Any], encoder_section: str, image_size: int,
                 section: str) -> None:
    """One-line errors for a cache made at another image size than `{section}.image_size` (checked first: the more
    specific of the two when the encoder's input size changed with it) or by another encoder (`encoder_section`
    names the expected one)."""
    if manifest["image_size"] != image_size:
        raise ConfigError(
            f"--data {where} caches {manifest['image_size']} px images but {section}.image_size = {image_size}; "
            f"set {section}.image_size = {manifest['image_size']} or cache the data again"
        )
    if manifest["encoder"] != encoder:
        raise ConfigError(
            f"--data {where} caches the latents of encoder {manifest['encoder']}, but {encoder_section} names "
            f"{encoder}; cache the data again with this profile or train with the cache's encoder"
        )


def check_cache(manifest: dict[str, Any], where: Path, source: LatentSource, image_size: int, num_classes: int) -> None:
    """One-line errors for a cache of another encoder or image size, or with labels outside the model's classes."""
    check_origin(manifest, where, source.encoder_record(), source.where, image_size, "dit_training")
    if manifest["max_label"] >= num_classes:
        raise ConfigError(
            f"--data {where} holds label {manifest['max_label']}, outside the model's {num_classes} classes "
            f"(dit_training.num_classes); set num_classes to at least {manifest['max_label'] + 1}"
        )


class LatentCache:
    """A finished cache as a resumable stream of `(tokens (N, C) float32, label, (epoch, j))`.

    Every epoch the cached images are permuted by `Random(seed, epoch)` (train) and rank r takes the r-th of
    `world_size` equal contiguous parts (drop-last). With `hflip` (and flipped latents in the cache), each sample's
    flipped latents are taken with probability 1/2, drawn from torch's global generator (checkpointed).
    """

    purpose = "dit"  # the manifest's "for" this reader reads

    def __init__(self, path: str | Path, *, train: bool, hflip: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        self.folder, self.manifest = read_manifest(path)
        m = self.manifest
        check_purpose(m, self.folder, self.purpose)
        if hflip and train and not m["hflip"]:
            raise ConfigError(
                f"--data {self.folder} holds no flipped latents but dit_training.hflip = true; set hflip = false or "
                "cache the data again with hflip = true"
            )
        self.hflip = hflip and train
        self.items = [(c, row) for c, chunk in enumerate(m["chunks"]) for row in range(chunk["count"])]
        self.classes, self.num_classes = m.get("classes"), m["num_classes"]
        self.train = train
        self.order = EpochOrder(len(self.items), kind="latent-cache", tag="srae-latent-cache",
                                where=f"--data {self.folder}", shuffle=train, rank=rank, world_size=world_size, seed=seed)
        self.images_per_epoch = self.order.per_epoch
        self._open: OrderedDict[int, Any] = OrderedDict()

    def _chunk(self, c: int) -> Any:
        from safetensors import SafetensorError, safe_open

        if c not in self._open:
            path = self.folder / self.manifest["chunks"][c]["file"]
            try:
                self._open[c] = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as exc:
                raise DataError(f"{path}: unreadable cache chunk ({type(exc).__name__}); write the cache again") from None
            if len(self._open) > OPEN_CHUNKS:
                self._open.popitem(last=False)
        self._open.move_to_end(c)
        return self._open[c]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, tuple[int, int]]]:
        for i, position in self.order.items():
            c, row = self.items[i]
            f = self._chunk(c)
            name = "latents_flipped" if self.hflip and bool(torch.rand(()) < 0.5) else "latents"
            tokens = f.get_slice(name)[row : row + 1][0].float()  # (N, C)
            label = int(f.get_slice("labels")[row : row + 1][0])
            yield tokens, label, position

    def skip(self, count: int) -> None:
        self.order.skip(count)

    def mark_consumed(self, positions: list[tuple[int, int]]) -> None:
        self.order.mark_consumed(positions)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


class CachedImages(LatentCache, ImageStream):
    """A latent cache for the decoder as a resumable stream of `((pixels (3, S, S) in [0, 1], latents (N, C)),
    position)`, shuffled per epoch and split across ranks as `LatentCache` (no flips: the decoder trainer has none).
    """

    purpose = "decoder"

    def __init__(self, path: str | Path, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        super().__init__(path, train=True, hflip=False, rank=rank, world_size=world_size, seed=seed)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], Position]]:
        for i, position in self.order.items():
            c, row = self.items[i]
            f = self._chunk(c)
            pixels = f.get_slice("pixels")[row : row + 1][0].float() / 255.0  # as `to_tensor`: k / 255
            yield (pixels, f.get_slice("latents")[row : row + 1][0].float()), position


def open_cached_images(path: str | Path, *, encoder: dict[str, Any], image_size: int, rank: int = 0,
                       world_size: int = 1, seed: int = 0) -> CachedImages:
    """`CachedImages` of the cache at `path`, refused in one line when another encoder or image size made it."""
    stream = CachedImages(path, rank=rank, world_size=world_size, seed=seed)
    check_origin(stream.manifest, stream.folder, encoder, "model", image_size, "decoder_training")
    return stream
