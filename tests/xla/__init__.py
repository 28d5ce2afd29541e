"""The XLA lane's tests (CPU PJRT, 4 virtual devices). Importing this package sets the PJRT environment before
torch_xla loads; in the lane (SRAE_XLA_LANE=1) a missing torch_xla fails loudly, elsewhere each module is skipped.
"""

import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")
if os.environ.get("SRAE_XLA_LANE") == "1":
    import torch_xla  # noqa: F401  (the lane must have it: fail loudly, never skip)
else:
    pytest.importorskip("torch_xla", reason="torch_xla is only in the XLA lane (.venv-xla)")
