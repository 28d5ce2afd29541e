"""CPU and CUDA: one plain process, or torchrun with torch.distributed and FSDP2.

* ``WORLD_SIZE`` unset or 1: no process group, the model stays a plain module on the device.
* Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set): the process group is initialised here
  (``gloo`` on cpu, ``nccl`` on cuda, or what ``backend.dist_backend`` names), each process drives the GPU
  of its local rank, and :meth:`CpuCudaBackend.shard_model` applies FSDP2 (``fully_shard``) over a 1-D
  device mesh of all processes: one unit per block, then the root. FSDP2 runs on CPU with gloo as well
  (the 2-process tests do exactly that).

Precision: master weights and optimizer state are always fp32. With ``precision = 'bf16'`` on cuda the FSDP
mixed-precision policy gathers parameters in bf16 and reduces gradients in fp32; on cpu (and for one
process) bf16 is applied by :meth:`autocast` alone.
"""

from __future__ import annotations

import atexit
import gc
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from scale_rae_core.backends.base import Backend
from scale_rae_core.config import BackendSettings
from scale_rae_core.errors import BackendError


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BackendError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun or unset it") from None


class CpuCudaBackend(Backend):
    """torch.distributed on CPU (gloo) or CUDA (nccl); a plain single process when WORLD_SIZE is 1."""

    def __init__(self, settings: BackendSettings):
        if settings.kind not in ("cpu", "cuda"):
            raise BackendError(f"backend.kind = '{settings.kind}' is not handled by the cpu/cuda backend; use get_backend()")
        self.settings = settings
        self._world = _env_int("WORLD_SIZE", 1)
        self._rank = _env_int("RANK", 0)
        self._local_rank = _env_int("LOCAL_RANK", 0)
        if self._world != settings.num_processes:
            raise BackendError(
                f"backend: the profile expects {settings.num_processes} processes (backend.nodes × backend.procs_per_node) "
                f"but WORLD_SIZE is {self._world}; launch with torchrun --nproc-per-node {settings.procs_per_node} "
                f"or --set backend.procs_per_node={self._world}"
            )

        if settings.kind == "cuda":
            if not torch.cuda.is_available():
                raise BackendError("backend.kind = 'cuda' but no CUDA device is visible; use a cpu profile or check CUDA_VISIBLE_DEVICES")
            if self._local_rank >= torch.cuda.device_count():
                raise BackendError(
                    f"LOCAL_RANK {self._local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                    "lower backend.procs_per_node (torchrun --nproc-per-node) to the GPU count"
                )
            self._device = torch.device("cuda", self._local_rank)
            torch.cuda.set_device(self._device)
        else:
            self._device = torch.device("cpu")

        self._owns_group = False
        self._mesh: DeviceMesh | None = None
        if self._world > 1:
            name = settings.dist_backend
            if name == "auto":
                name = "nccl" if settings.kind == "cuda" else "gloo"
            if not dist.is_initialized():
                kwargs = {"device_id": self._device} if settings.kind == "cuda" else {}
                dist.init_process_group(backend=name, **kwargs)
                self._owns_group = True
                # Sharded modules hold reference cycles through their process group; left to the interpreter's
                # final teardown, collecting them aborted ~1 in 10 clean gloo runs ("terminate called without an
                # active exception", SIGABRT after the work was done). Collect them while Python is still whole.
                atexit.register(gc.collect)
            self._mesh = init_device_mesh(self._device.type, (self._world,), mesh_dim_names=("dp",))

    # ------------------------------------------------------------------------------------- identity
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def distributed(self) -> bool:
        return self._mesh is not None

    # ------------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        if not out.is_floating_point():
            out = out.double()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)  # gloo has no AVG
            out /= self._world
        return out

    # ------------------------------------------------------------------------------------- parallelism
    def shard_model(self, model: nn.Module, block_types: tuple[type[nn.Module], ...], frozen: Sequence[nn.Module] = ()) -> nn.Module:
        """Fixed order: freeze → activation checkpointing per block → compile per block → move to device →
        FSDP2 per block → FSDP2 on the root (frozen parameters ignored, i.e. replicated).

        Activation checkpointing uses the composable API, so parameter names (and checkpoints) are the same
        with and without it. Blocks inside a frozen module are left alone.
        """
        frozen_modules: set[int] = set()
        frozen_params: set[nn.Parameter] = set()
        for module in frozen:
            frozen_modules.update(id(m) for m in module.modules())
            for p in module.parameters():
                p.requires_grad_(False)
                frozen_params.add(p)
        blocks = [m for m in model.modules() if isinstance(m, block_types) and id(m) not in frozen_modules] if block_types else []

        if self.settings.gradient_checkpointing:
            for block in blocks:
                checkpoint_activations(block)
        if self.settings.compile:
            for block in blocks:
                block.compile()  # in place: keeps the module (and its parameter names)

        model.to(self._device)
        for module in frozen:
            module.to(self._device)  # also when a frozen module is held outside `model`

        if self._mesh is not None:
            if self.settings.precision == "bf16" and self._device.type == "cuda":
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            else:
                mp = MixedPrecisionPolicy()
            for block in blocks:
                fully_shard(block, mesh=self._mesh, mp_policy=mp)
            model_frozen = {p for p in model.parameters() if p in frozen_params}
            fully_shard(model, mesh=self._mesh, mp_policy=mp, ignored_params=model_frozen or None)
        return model

    # ------------------------------------------------------------------------------------- randomness
    def device_rng_state(self) -> dict[str, torch.Tensor]:
        if self._device.type == "cuda":
            return {"cuda": torch.cuda.get_rng_state(self._device)}
        return {}

    def set_device_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        if self._device.type == "cuda" and "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], self._device)

    # ------------------------------------------------------------------------------------- lifetime
    def __exit__(self, exc_type: object, *exc: object) -> None:
        # A clean end waits for every rank before the group is torn down: a rank that destroys its gloo group
        # while a peer is still in a collective can abort the peer at exit ("terminate called without an active
        # exception"). After an error the peers may never arrive, so no barrier then.
        if exc_type is None and self._owns_group and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        self.close()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
        self._mesh = None
