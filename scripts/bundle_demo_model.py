"""Put a trained shapes model into the package as the bundled demo model (the default ``--model``).

For a model the demo trained (``srae demo --retrain``), ``srae demo --install`` does this; this script is for a
model made by separate commands (how the current bundled model was made, see its ``ABOUT.json``).

    python scripts/bundle_demo_model.py --model RUN/export --decoder DEMO/decoder/decoder \
        --bench BENCH.json --command "srae train stage1 ..." [--command ...]

Writes ``scale_rae_core/assets/shapes-demo/``: the export with fp16 weights, ``decoder/``, and ``ABOUT.json``
(the commands that made it, the benchmark it scored, the date). The shapes benchmark JSON must come from
``srae eval shapes --model`` run on the bundled files themselves (``--bench`` is read, not recomputed), so run it
once on a bundle written to a scratch folder (``--dest``) first, then bundle again into the package.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from scale_rae_core.infer.bundle import bundle_model
from scale_rae_core.infer.loading import BUNDLED_MODEL
from scale_rae_core.shapes.bench import about_fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="srae export (stage 1/2 export/ folder)")
    parser.add_argument("--decoder", required=True, type=Path, help="srae decoder folder")
    parser.add_argument("--bench", type=Path, help="srae eval shapes JSON of this model (summary goes to ABOUT.json)")
    parser.add_argument("--command", action="append", default=[], help="a command that made the model (repeatable)")
    parser.add_argument("--dest", type=Path, default=BUNDLED_MODEL, help="where to write (default: the package assets)")
    args = parser.parse_args()
    about: dict = {"made_by": args.command, "date": datetime.date.today().isoformat()}
    if args.bench:
        about.update(about_fields(json.loads(args.bench.read_text())))
    path = bundle_model(args.model, args.decoder, args.dest, half=True, about=about)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"{path}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
