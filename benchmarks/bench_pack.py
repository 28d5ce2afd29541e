"""Images/s of `srae data pack` against a plain single-process PIL + webdataset.TarWriter loop.

Both read the same captioned JPEG folder, decode to RGB, encode PNG (same settings) and write tar shards of
``--samples-per-shard`` samples; pack also validates inputs, writes its manifest and checksums and fsyncs
each finished shard. Prints one markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pack.py            # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_pack.py --n64 2000 --n256 600        # longer, steadier
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from scale_rae_core.data.pack import pack
from scale_rae_core.data.transforms import encode_image


def make_inputs(root: Path, n: int, size: int) -> Path:
    """``n`` captioned JPEGs of ``size``x``size``: smooth gradients plus noise, like downscaled photos."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx, b * yy, c * (1 - xx) * yy], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:06d}.jpg", quality=90)
        (root / f"{i:06d}.txt").write_text(f"a gradient with colours {a:.0f} {b:.0f} {c:.0f}")
    return root


def baseline(src: Path, out: Path, samples_per_shard: int) -> float:
    """The plain loop: sorted files, PIL decode, PNG encode, TarWriter shards. Returns seconds."""
    out.mkdir(parents=True)
    start = time.perf_counter()
    images = sorted(src.glob("*.jpg"))
    writer = None
    for i, path in enumerate(images):
        if i % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(out / f"shard-{i // samples_per_shard:06d}.tar"))
        caption = path.with_suffix(".txt").read_text().strip()
        im = Image.open(path).convert("RGB")
        obj = {
            "conversations": [{"from": "human", "value": f"Generate an image of {caption}"}, {"from": "gpt", "value": "<image>"}],
            "metadata": {},
            "image_filename": f"{i:09d}.png",
        }
        writer.write({"__key__": f"{i:09d}", "json": json.dumps(obj).encode(), "png": encode_image(im, "png")})
    if writer is not None:
        writer.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n64", type=int, default=400, help="number of 64-px images")
    parser.add_argument("--n256", type=int, default=150, help="number of 256-px images")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, n in ((64, args.n64), (256, args.n256)):
            src = make_inputs(Path(tmp) / f"in{size}", n, size)
            base_s = baseline(src, Path(tmp) / f"base{size}", args.samples_per_shard)
            rates = []
            for workers in (1, 2):
                s = pack(src, Path(tmp) / f"pack{size}-{workers}", task="generation",
                         samples_per_shard=args.samples_per_shard, workers=workers)
                assert s.packed == n and s.skipped == 0
                rates.append(n / s.seconds)
            rows.append((size, n, n / base_s, *rates))

    print("| input | images | baseline PIL+TarWriter, 1 proc (img/s) | srae pack, workers=1 (img/s) | srae pack, workers=2 (img/s) |")
    print("|---|---:|---:|---:|---:|")
    for size, n, base, w1, w2 in rows:
        print(f"| {size}x{size} JPEG -> PNG | {n} | {base:.0f} | {w1:.0f} | {w2:.0f} |")


if __name__ == "__main__":
    main()
