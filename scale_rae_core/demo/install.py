"""``srae demo --install``: make a demo run's model the package's bundled model, the default ``--model``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scale_rae_core.errors import SraeError
from scale_rae_core.infer import loading
from scale_rae_core.infer.bundle import ABOUT_FILE, copy_bundle
from scale_rae_core.shapes.bench import about_fields


def install_bundled(model: str | Path, bench_file: str | Path, quality: list[dict[str, Any]],
                    dest: str | Path | None = None) -> Path:
    """Make ``model`` (a demo's ``OUT/model``) the package's bundled model, the default ``--model``.

    Refused while a quality bar in ``quality`` (the demo's ``check_bars`` rows) is missed: the bundled model is what
    ``srae generate`` uses when nothing is named. ``ABOUT.json`` keeps the model's provenance (``made_by``, commit,
    profile, date) and gains the shapes benchmark in ``bench_file`` and the bars.
    """
    model, bench_file = Path(model), Path(bench_file)
    missed = [q for q in quality if not q["ok"]]
    if missed:
        q = missed[0]
        raise SraeError(f"--install: {q['label']} = {q['value']:.4g} misses its bar ({q['minimum']:.4g}); "
                        f"the bundled model stays as it is ({q.get('fix', 'train longer, e.g. --retrain')})")
    if not (model / "config.json").is_file() or not bench_file.is_file():
        raise SraeError(f"--install: no finished model ({model}) and benchmark ({bench_file}); run the demo to the end first")
    about = json.loads((model / ABOUT_FILE).read_text()) if (model / ABOUT_FILE).is_file() else {}
    about.update(about_fields(json.loads(bench_file.read_text())))
    about["quality_bars"] = {q["key"]: {"value": q["value"], "minimum": q["minimum"]} for q in quality}
    return copy_bundle(model, dest or loading.BUNDLED_MODEL, about)
