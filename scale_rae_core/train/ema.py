"""Exponential moving average of a module's weights, held in a separate module.

    ema_p <- decay * ema_p + (1 - decay) * live_p        for every floating-point parameter
    ema_b <- live_b                                      for every buffer (running stats, constants)

The copy is a real, independent module. The reference deep-copied a model whose `forward` had been
replaced by `torch.compile(model.forward)`; the copy kept that instance attribute, a closure over the live
model, so "EMA" evaluation ran the live weights (rae.md §12.1). Here the source is unwrapped first
(`torch.compile` → `_orig_mod`, DDP/FSDP1 → `.module`) and, after copying, every instance attribute that
shadows a method of the module's class (`forward`, `encode`, ... set by compile or patching) is removed, so
the copy always runs its own class's code on its own weights. Compile the EMA module separately if wanted.

`update` matches tensors by name, ignoring wrapper prefixes (`module.`, `_orig_mod.`,
`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`, torch_xla's `_orig_module.`), so the live model may be
wrapped differently from the copy. When the copy is sharded like the live model (FSDP2: both DTensors; XLA
SPMD: both FSDPv2-sharded) the update is local; when only the live model is sharded its tensors are gathered
with `full_tensor()` (a collective every update). Build the EMA from the model before parallelism is applied;
shard `ema.module` afterwards in the same way if the full copy does not fit on one device (assign the wrapper a
backend returns to `ema.module`): the tensors are looked up in `ema.module` at every update, so the sharded
parameters that replace the originals are the ones averaged.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from scale_rae_core.errors import CheckpointError

WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_module.")


def _canonical(name: str) -> str:
    """A tensor name without wrapper components (`module.`, `_orig_mod.`, ...) anywhere in it."""
    parts = [p for p in name.split(".") if f"{p}." not in WRAPPER_PREFIXES]
    return ".".join(parts)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under `torch.compile` / DDP / FSDP1 wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "FullyShardedDataParallel",
            "DataParallel",
        ):
            model = model.module  # type: ignore[assignment]
        else:
            return model


def _detach_from_source(module: nn.Module) -> None:
    """Make a deep copy run its own code: replace compiled submodules (`OptimizedModule`, whose forward is a
    closure over the original module) by their `_orig_mod`, and remove instance attributes that hide a
    method of the class (`m.forward = torch.compile(m.forward)` is a closure over the live module)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            while hasattr(child, "_orig_mod") and isinstance(child._orig_mod, nn.Module):
                child = child._orig_mod
            setattr(parent, name, child)
    for m in module.modules():
        for name in [k for k, v in vars(m).items() if callable(v) and not isinstance(v, nn.Module)]:
            if inspect.isfunction(inspect.getattr_static(type(m), name, None)):
                delattr(m, name)


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(canonical name, tensor, is_parameter) for every parameter and buffer."""
    for name, p in module.named_parameters(remove_duplicate=True):
        yield _canonical(name), p, True
    for name, b in module.named_buffers(remove_duplicate=True):
        yield _canonical(name), b, False


def _local(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` in a form `like` can be updated from: gathered if `t` is sharded and `like` is not."""
    if hasattr(t, "full_tensor") and not hasattr(like, "full_tensor"):
        t = t.full_tensor()  # type: ignore[operator]
    return t.detach().to(device=like.device, dtype=like.dtype)


class EMA:
    """A separate, frozen copy of `model` whose weights track the live ones."""

    def __init__(self, model: nn.Module) -> None:
        src = unwrap(model)
        self.module: nn.Module = copy.deepcopy(src)
        _detach_from_source(self.module)
        self.module.requires_grad_(False)
        self.module.eval()
        named = list(_named_tensors(self.module))
        assert len(self._tensors) == len(named), "two tensors share a name once wrapper prefixes are removed"

    @property
    def _tensors(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """name -> (tensor, is_parameter) of the averaged module as it is now (sharding replaces parameters)."""
        return {name: (t, is_param) for name, t, is_param in _named_tensors(self.module)}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * model for floating parameters; buffers are copied."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        live = {name: (t, is_param) for name, t, is_param in _named_tensors(model)}
        tensors = self._tensors
        missing = [name for name in tensors if name not in live]
        if missing:
            raise ValueError(
                f"EMA update: the live model has no tensor {missing[0]!r} ({len(missing)} missing); "
                "pass the same architecture the EMA was built from"
            )
        for name, (ema_t, is_param) in tensors.items():
            src = _local(live[name][0], ema_t)
            if is_param and ema_t.is_floating_point():
                ema_t.lerp_(src, 1.0 - decay)
            else:
                ema_t.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged module's state dict (loads into a plain model of the same architecture)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Strictly load averaged weights; `source` names the file in the error message."""
        own = self.module.state_dict()
        missing = [k for k in own if k not in state]
        extra = [k for k in state if k not in own]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has unexpected {extra[0]!r}"
            raise CheckpointError(
                f"{source}: EMA weights {what} ({len(missing)} missing, {len(extra)} unexpected keys); "
                "resume with the model configuration the checkpoint was trained with"
            )
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"{source}: EMA weight {k!r} has shape {tuple(state[k].shape)}, the model expects "
                    f"{tuple(v.shape)}; resume with the model configuration the checkpoint was trained with"
                )
        self.module.load_state_dict(state, strict=True)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged parameters and buffers into `module` (matched by name, wrappers ignored)."""
        target = {name: t for name, t, _ in _named_tensors(module)}
        tensors = self._tensors
        missing = [name for name in tensors if name not in target]
        if missing:
            raise ValueError(
                f"EMA copy_to: the target has no tensor {missing[0]!r}; pass the same architecture"
            )
        for name, (ema_t, _) in tensors.items():
            dst = target[name]
            src = ema_t
            if hasattr(dst, "full_tensor") and not hasattr(src, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)
            dst.copy_(src.to(dtype=dst.dtype))
