"""What a continued run must share with the run it continues, and the one refusal when it does not.

Two commands continue earlier work in place: ``srae train ... --resume`` (the newest checkpoint of RUN) and
``srae scale`` (a run folder that already holds samples). Each records the settings and inputs that change its
outputs — the trajectory-relevant profile keys and data path of a training run, the model and decoder weights'
revisions and every sampling setting of a scaling run — and compares them with its own before continuing::

    error: runs/s1: checkpoint step-00000004 was made with other settings: stage1.lr 0.001 -> 0.002,
    stage1.global_batch_size 4 -> 8; resume with the same settings, choose a new --out, or pass --accept-changes
    to continue with the new ones

``--accept-changes`` (:data:`ACCEPT_FLAG`, the same name on every command) continues with the new settings and
the difference is reported. Keys the recorded side lacks are not compared, so runs written before a key was
recorded still continue.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from scale_rae_core.errors import ConfigError

ACCEPT_FLAG = "--accept-changes"
SHOWN = 6  # differences listed in the one line; the rest are counted


class RunChangedError(ConfigError):
    """A continued run's settings or inputs differ from the ones its earlier part was made with."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; values as JSON gives them back (tuples become lists)."""
    plain = json.loads(json.dumps(tree, default=str))
    out: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = node

    walk(plain, prefix)
    return out


def pick(flat: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    """The entries of a flattened tree at or below any of the dotted ``prefixes``."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every key both sides hold with different values (flat dicts)."""
    return [(k, recorded[k], current[k]) for k in sorted(recorded)
            if k in current and recorded[k] is not None and recorded[k] != current[k]]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:16] + "…" + text[-43:]  # paths differ at their ends


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """``key old -> new, ...`` (at most :data:`SHOWN`, then ``(+N more)``)."""
    shown = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in diffs[:SHOWN])
    return shown + (f" (+{len(diffs) - SHOWN} more)" if len(diffs) > SHOWN else "")


def check_unchanged(recorded: Mapping[str, Any], current: Mapping[str, Any], *, made: str, fix: str,
                    accept: bool) -> list[tuple[str, Any, Any]]:
    """Compare two flat fingerprints; raise :class:`RunChangedError` (one line: ``made`` (e.g. "RUN: checkpoint
    step-4 was made") with other settings, every difference, ``fix``) unless ``accept``. Returns the
    differences (empty when none)."""
    diffs = differences(recorded, current)
    if diffs and not accept:
        raise RunChangedError(
            f"{made} with other settings: {describe(diffs)}; {fix}, or pass {ACCEPT_FLAG} to continue with the "
            "new ones"
        )
    return diffs
