"""LPIPS (VGG16 variant): the perceptual term of the decoder loss.

The network follows the `lpips` package / taming-transformers "vgg" LPIPS, written with plain torch
modules so that no torchvision is needed:

    x, y in [-1, 1] -> scaling layer ((x - shift) / scale)
      -> VGG16 conv stack, taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
      -> per tap: unit-normalise over channels, squared difference, 1x1 `lin` conv (no bias), spatial mean
      -> sum over the 5 taps                                              -> one distance per sample

Weights are the user's, read from local files (nothing is downloaded):

- VGG16: torchvision's ImageNet file `vgg16-397923af.pth`
  (https://download.pytorch.org/models/vgg16-397923af.pth). `VGG16Features` has exactly the layout of
  torchvision's `vgg16().features` (`features.0.weight` ... `features.28.bias`), so the full VGG16 state
  dict (its `classifier.*` keys are ignored) or a features-only one (`0.weight` ...) loads strictly.
- lin layers: the LPIPS v0.1 `vgg.pth` (keys `lin0.model.1.weight` ... `lin4.model.1.weight`, each
  [1, C, 1, 1]). taming-transformers' `vgg.pth` is the same file (identical md5
  d507d7349b931f0638a25a48a722f98a); it ships inside the `lpips` wheel at `lpips/weights/v0.1/vgg.pth`
  (`pip download lpips==0.1.4 --no-deps`, then unzip). `lin{i}.model.0.weight` (no-dropout variant) and
  `lins.{i}.model.1.weight` keys are accepted too, as is one combined file holding a whole LPIPS state dict
  (`net.slice{k}.{n}.*` or `net.features.{n}.*` plus the lin keys).

The module is frozen (no parameter requires grad) and always in eval mode; gradients still flow to the
inputs, which is what the decoder loss needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from scale_rae_core.errors import CheckpointError
from scale_rae_core.files import read_plain_state_dict

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision's VGG16 "D" configuration; "M" is a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)
TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)

VGG_FILES = ("vgg16-397923af.pth", "vgg16.pth", "vgg16.safetensors")
LIN_FILES = ("vgg.pth", "vgg_lpips.pth", "lpips_vgg.pth", "vgg.safetensors")
VGG_HINT = (
    "download vgg16-397923af.pth from the torchvision model zoo "
    "(https://download.pytorch.org/models/vgg16-397923af.pth) and set decoder_training.lpips_weights to its folder"
)
LIN_HINT = (
    "get the LPIPS v0.1 vgg.pth (inside the lpips wheel: `pip download lpips==0.1.4 --no-deps`, unzip, "
    "lpips/weights/v0.1/vgg.pth) and put it next to the VGG16 file in decoder_training.lpips_weights"
)


class VGG16Features(nn.Module):
    """VGG16 conv stack up to relu5_3 (`features[0:30]`), same state-dict keys as torchvision's."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)  # 30 modules: index 29 is relu5_3
        assert len(self.features) == TAPS[-1] + 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)  # (B, C_k, H / 2^k, W / 2^k)
        return taps


class NetLinLayer(nn.Module):
    """Dropout + 1x1 conv to one channel, no bias (keys `model.1.weight`, as in the LPIPS files)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalise(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


# ---------------------------------------------------------------------------------------------------------
# weight files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"LPIPS weights: {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"LPIPS weights: cannot read {path} ({type(e).__name__}); re-download the file") from None
    return read_plain_state_dict(path, "a state dict of tensors (LPIPS weights)", fix="re-download the file",
                                 inner="state_dict")


_VGG_KEY = re.compile(r"^(?:.*\.)?(?:features|slice\d)\.(\d+)\.(weight|bias)$|^(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^(?:.*\.)?(?:lin(\d)|lins\.(\d))\.model\.[01]\.weight$")


def _vgg_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`features.N.*` entries out of any accepted layout (torchvision, features-only, LPIPS `net.sliceK`)."""
    out = {}
    for key, value in sd.items():
        m = _VGG_KEY.match(key)
        if m and not key.startswith("classifier."):
            idx, kind = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            out[f"features.{idx}.{kind}"] = value
    return out


def _lin_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`lin{i}.model.1.weight` entries out of any accepted layout."""
    out = {}
    for key, value in sd.items():
        m = _LIN_KEY.match(key)
        if m:
            i = m.group(1) if m.group(1) is not None else m.group(2)
            out[f"lin{i}.model.1.weight"] = value
    return out


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


# ---------------------------------------------------------------------------------------------------------
# the metric


class LPIPS(nn.Module):
    """VGG16 LPIPS distance. `forward(x, y)` with x, y [B, 3, H, W] in [-1, 1] returns [B] distances."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lin0 = NetLinLayer(CHANNELS[0])
        self.lin1 = NetLinLayer(CHANNELS[1])
        self.lin2 = NetLinLayer(CHANNELS[2])
        self.lin3 = NetLinLayer(CHANNELS[3])
        self.lin4 = NetLinLayer(CHANNELS[4])
        self._freeze()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Frozen: stays in eval mode (dropout off) whatever `mode` is."""
        return super().train(False)

    @property
    def lins(self) -> list[NetLinLayer]:
        return [self.lin0, self.lin1, self.lin2, self.lin3, self.lin4]

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def random(cls, seed: int = 0) -> LPIPS:
        """Random weights from `seed` (tests, offline runs): He-normal convs, positive lin weights."""
        g = torch.Generator().manual_seed(seed)
        model = cls()
        with torch.no_grad():
            for layer in model.net.features:
                if isinstance(layer, nn.Conv2d):
                    fan_in = layer.in_channels * 9
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                    layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.01)
            for lin, c in zip(model.lins, CHANNELS, strict=True):
                conv = lin.model[1]
                assert isinstance(conv, nn.Conv2d)
                conv.weight.copy_(torch.rand(conv.weight.shape, generator=g) * (2.0 / c))
        return model

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        """VGG16 weights from `vgg_path` (torchvision layout) and lin weights from `lin_path` (LPIPS layout)."""
        vgg_path, lin_path = Path(vgg_path), Path(lin_path)
        if not vgg_path.is_file():
            raise CheckpointError(f"LPIPS weights: VGG16 file {vgg_path} is missing; {VGG_HINT}")
        if not lin_path.is_file():
            raise CheckpointError(f"LPIPS weights: lin file {lin_path} is missing; {LIN_HINT}")
        model = cls()
        model._load_vgg(_read_state_dict(vgg_path), vgg_path)
        model._load_lin(_read_state_dict(lin_path), lin_path)
        return model

    @classmethod
    def load(cls, path: str | Path) -> LPIPS:
        """From a folder holding the VGG16 file (`vgg16-397923af.pth`) and the lin file (`vgg.pth`), or from
        one file holding a whole LPIPS state dict (VGG and lin keys together)."""
        path = Path(path)
        if path.is_file():
            model = cls()
            sd = _read_state_dict(path)
            model._load_vgg(sd, path)
            model._load_lin(sd, path)
            return model
        if not path.is_dir():
            raise CheckpointError(f"LPIPS weights: {path} does not exist; {VGG_HINT}, and {LIN_HINT}")
        vgg = _find(path, VGG_FILES)
        if vgg is None:
            raise CheckpointError(f"LPIPS weights: no {VGG_FILES[0]} in {path}; {VGG_HINT}")
        lin = _find(path, LIN_FILES)
        if lin is None:
            raise CheckpointError(f"LPIPS weights: no {LIN_FILES[0]} in {path}; {LIN_HINT}")
        return cls.from_files(vgg, lin)

    def _load_vgg(self, sd: dict[str, torch.Tensor], path: Path) -> None:
        vgg = _vgg_keys(sd)
        want = {k: tuple(v.shape) for k, v in self.net.state_dict().items()}
        missing = [k for k in want if k not in vgg]
        if missing:
            raise CheckpointError(
                f"LPIPS weights: {path} lacks {missing[0]} (and {len(missing) - 1} more VGG16 keys); {VGG_HINT}"
            )
        for key, shape in want.items():
            if tuple(vgg[key].shape) != shape:
                raise CheckpointError(
                    f"LPIPS weights: {path} has {key} of shape {tuple(vgg[key].shape)}, expected {shape}; {VGG_HINT}"
                )
        extra = sorted(set(vgg) - set(want))
        if extra:
            raise CheckpointError(
                f"LPIPS weights: {path} has {extra[0]}, which VGG16 does not (another VGG depth?); {VGG_HINT}"
            )
        self.net.load_state_dict(vgg, strict=True)

    def _load_lin(self, sd: dict[str, torch.Tensor], path: Path) -> None:
        lin = _lin_keys(sd)
        want = {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(CHANNELS)}
        missing = sorted(set(want) - set(lin))
        if missing:
            raise CheckpointError(
                f"LPIPS weights: {path} lacks {missing[0]} (and {len(missing) - 1} more); {LIN_HINT}"
            )
        for key, shape in want.items():
            if tuple(lin[key].shape) != shape:
                raise CheckpointError(
                    f"LPIPS weights: {path} has {key} of shape {tuple(lin[key].shape)}, expected {shape}; {LIN_HINT}"
                )
        with torch.no_grad():
            for i, layer in enumerate(self.lins):
                layer.model[1].weight.copy_(lin[f"lin{i}.model.1.weight"])

    # ---- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B] LPIPS distances between x and y, both [B, 3, H, W] in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two [B, 3, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        B = x.shape[0]
        both = torch.cat([x, y], dim=0)  # one VGG pass for the pair: (2B, 3, H, W)
        both = (both - self.shift.to(both.dtype)) / self.scale.to(both.dtype)
        total = both.new_zeros(B)
        for feat, lin in zip(self.net(both), self.lins, strict=True):
            fx, fy = _unit_normalise(feat[:B]), _unit_normalise(feat[B:])
            d = lin((fx - fy).square())  # (B, 1, h, w)
            total = total + d.mean(dim=(1, 2, 3))
        return total
