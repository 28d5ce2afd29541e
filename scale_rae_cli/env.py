"""`srae env`: versions, devices and the resolved profile, for bug reports."""

from __future__ import annotations

from scale_rae_cli.options import ProfileOpt, SetOpt, load

EPILOG = "Example: srae env --profile gpu-1"


def env(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Print python/torch/transformers/torch_xla versions, visible devices and the resolved profile."""
    import json

    from scale_rae_core.environment import describe

    info = describe()
    prof = load(profile, set_)
    info["profile"] = {"source": prof.source, **prof.to_toml_dict()}
    print(json.dumps(info, indent=2))
