"""What the engine asks of a backend: where tensors live, who this process is, and how to parallelise.

Trainers and the inference pipeline talk to a :class:`Backend` only; they never call ``torch.cuda`` or
``torch_xla`` themselves. ``scale_rae_core.backends.get_backend`` picks the implementation for the profile's
``[backend]`` section.

Parallelism is applied after the model is built, in one place (:meth:`Backend.shard_model`) and in a fixed
order: activation checkpointing per block → ``torch.compile`` per block → data-parallel sharding per block,
then the root. Frozen modules (the vision encoder) are not sharded, only moved to the device.

Seeding: :meth:`Backend.seed_everything` seeds python, numpy and torch with ``seed + rank`` by default, so
ranks draw different noise. Build the model after ``seed_everything(seed, per_rank=False)`` (or with an
explicit ``torch.manual_seed``) so every rank starts from the same weights before sharding.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta

import numpy as np
import torch
from torch import nn

from scale_rae_core.config import BackendSettings
from scale_rae_core.errors import BackendError


class Backend(ABC):
    """One process's view of the machine(s) a run uses."""

    settings: BackendSettings

    # ------------------------------------------------------------------------------------- identity
    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where this process's tensors (model, batches) live."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """Global index of this process (0 … num_processes − 1)."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """Host processes taking part (torch.distributed's world size); the same as :attr:`num_processes`."""

    @property
    def num_processes(self) -> int:
        """Host processes; each loads its own share of the data (one per TPU host under xla SPMD)."""
        return self.world_size

    @property
    def num_devices(self) -> int:
        """Accelerators the run spans: one per process on cpu/cuda, every chip of the slice on xla."""
        return self.world_size

    @property
    @abstractmethod
    def local_rank(self) -> int:
        """Index of this process on its machine."""

    @property
    def is_main(self) -> bool:
        """True on the one process that writes shared files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a torch.distributed process group is active (collectives are real)."""
        return False

    # ------------------------------------------------------------------------------------- collectives
    @abstractmethod
    def barrier(self) -> None:
        """Wait until every process reaches this point (no-op for one process)."""

    @abstractmethod
    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over all processes (a new tensor; the input is not modified)."""

    def mark_step(self) -> None:
        """End of one traced step; only lazy-tensor backends (xla) do anything here."""
        return None  # nothing to do by default

    def shard_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """Put one input tensor of this process's batch on the device (xla also shards its batch axis)."""
        return tensor.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------- compute
    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype that matmuls run in under :meth:`autocast` (weights stay fp32)."""
        return torch.bfloat16 if self.settings.precision == "bf16" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device when the profile says ``precision = 'bf16'``; a no-op for fp32."""
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @abstractmethod
    def shard_model(self, model: nn.Module, block_types: tuple[type[nn.Module], ...], frozen: Sequence[nn.Module] = ()) -> nn.Module:
        """Apply parallelism to a built (fp32, CPU or meta-free) model and move it to :attr:`device`.

        ``block_types``: the repeated layers (e.g. ``(Qwen2DecoderLayer, DiTBlock)``) that get activation
        checkpointing and their own sharding unit. ``frozen``: sub-modules that are not trained; their
        parameters get ``requires_grad = False`` and are replicated, not sharded. Returns the module to
        train (the same object, modified in place). Build the optimizer after this call.
        """

    # ------------------------------------------------------------------------------------- checkpoint state
    def train_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """``{"model": ..., "optim": ...}`` in the engine-neutral layout checkpoints store (plain parameter
        names; FSDP2 shards stay DTensors so each rank writes its own part)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return {"model": get_model_state_dict(model)}
        msd, osd = get_state_dict(model, optimizer)
        return {"model": msd, "optim": osd}

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """*Collective.* The whole, unsharded model state on CPU with plain names (complete on rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_train_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
        """Put a state filled from a checkpoint (same layout as :meth:`train_state`) into model / optimizer."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    # ------------------------------------------------------------------------------------- randomness
    def seed_everything(self, seed: int, *, per_rank: bool = True) -> int:
        """Seed python, numpy and torch (every device) with ``seed + rank`` (or ``seed`` with
        ``per_rank=False``); returns the seed used."""
        used = seed + self.rank if per_rank else seed
        random.seed(used)
        np.random.seed(used % 2**32)
        torch.manual_seed(used)  # also seeds every CUDA device
        return used

    def device_rng_state(self) -> dict[str, torch.Tensor]:
        """RNG states of the accelerator(s) this process drives, as CPU uint8 tensors ({} on CPU)."""
        return {}

    def set_device_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`device_rng_state` returned (unknown keys are ignored)."""
        return None  # nothing to do by default

    # ------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the process group / runtime; the object is unusable afterwards."""
        return None  # nothing to do by default

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


HOST_GROUP_PORT = 12355  # MASTER_PORT default (torch_xla's too)
HOST_GROUP_TIMEOUT = timedelta(minutes=10)


def start_host_group(rank: int, world: int, *, what: str) -> None:
    """A gloo process group of ``world`` host processes (this one is ``rank``), for host-side data only.

    The rendezvous is a TCPStore at ``MASTER_ADDR:MASTER_PORT`` (port default 12355) served by the process running on
    that address (for a loopback address: rank 0), so no accelerator program runs to find the peers. ``what`` names
    the launch for the one-line error when ``MASTER_ADDR`` is unset.
    """
    import torch.distributed as dist

    addr = os.environ.get("MASTER_ADDR", "")
    if not addr:
        raise BackendError(
            f"{what}: {world} host processes need MASTER_ADDR (the internal IP of worker 0) for their host-side process "
            "group; set it on every host in the launch command (see the profile's launch line)"
        )
    try:
        port = int(os.environ.get("MASTER_PORT", HOST_GROUP_PORT))
    except ValueError:
        raise BackendError(f"{what}: MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number; set it or unset it") from None
    serves = rank == 0 if _is_loopback(addr) else _is_local_address(addr)
    store = dist.TCPStore(addr, port, world, is_master=serves, timeout=HOST_GROUP_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=HOST_GROUP_TIMEOUT)


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def _is_local_address(addr: str) -> bool:
    """True when ``addr`` resolves to one of this host's own addresses (it can be bound here)."""
    try:
        target = socket.gethostbyname(addr)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((target, 0))
        return True
    except OSError:
        return False
