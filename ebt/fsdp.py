"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models too large for data parallelism alone.

Under `torchrun`, `TrainConfig.fsdp` shards every parameter, its gradient and its AdamW state across the
processes (the optimizer state is what dominates memory: parameters + gradients + 2 moments = 16 bytes
per fp32 parameter, of which each process keeps 1/N). One FSDP unit spans the whole model with
`reshard_after_forward=False`:

- an EBT's training forward runs the blocks many times (a context stream per landscape, a candidate
  stream per step, through `Block.forward_candidates`, which no FSDP hook sees) and differentiates the
  energy inside the forward with `create_graph=True`; the loss's backward then walks that second-order
  graph back through every one of those uses. Resharding between uses would free the unsharded weights
  those graphs hold on to (per-block units with resharding also fire their post-backward reduce-scatter
  during the inner `autograd.grad`). With one unit kept unsharded from the forward to the end of the
  backward, the weights are all-gathered once per step and gradients are reduce-scattered once;
- an EBT therefore trains through `forward` + `loss.backward()` (`--ebt-grad full`), not through its
  own `train_step`, whose internal backward FSDP's reduce-scatter hooks would not see;
- so peak memory during the step holds the full parameters and gradients (as DDP does) but the
  optimizer state stays sharded, and between steps everything is sharded.

Checkpoints gather full tensors (the same `model.safetensors` as any run; the optimizer state is saved
by parameter name) so they load anywhere; an FSDP run resumes under FSDP with any number of processes.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist

from ebt.errors import ConfigError


def check_fsdp(world: int, cfg) -> None:
    """Refuse FSDP settings that cannot work (cfg: the TrainConfig), with the fix in the message."""
    if world < 2:
        raise ConfigError("fsdp shards a model across processes: launch with torchrun --nproc-per-node N "
                          "(N >= 2), or drop --fsdp for a single process")
    if cfg.compile:
        raise ConfigError("--fsdp with --compile is not supported here: drop one of them")
    if getattr(cfg, "cuda_graph", False):
        raise ConfigError("--fsdp with --cuda-graph is not supported: drop one of them")
    if getattr(cfg, "ebt_grad", "auto") not in ("auto", "full"):
        raise ConfigError(f"--fsdp trains an EBT through forward + backward of the whole unroll "
                          f"(--ebt-grad full); --ebt-grad {cfg.ebt_grad} runs its own backward, "
                          f"which FSDP's hooks do not see")
    if fully_shard_fn() is None:
        raise ConfigError(f"--fsdp needs torch >= 2.7 (FSDP2's public fully_shard, with ignored_params); "
                          f"this is torch {torch.__version__}: upgrade torch, or drop --fsdp to train with "
                          f"data parallelism")


def fully_shard_fn():
    """FSDP2's fully_shard as used here (public, with ignored_params: torch >= 2.7), or None before."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps it under torch.distributed._composable, without ignored_params
        return None
    return fully_shard if "ignored_params" in inspect.signature(fully_shard).parameters else None


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place over all processes (one unit, kept unsharded from forward to backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    fully_shard = fully_shard_fn()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # FSDP2 cannot shard 0-d parameters (an EBT's step size alpha): they stay whole on every process and
    # their gradient is averaged here, as DDP would
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=scalars or None)

    @contextlib.contextmanager
    def no_sync():  # what the trainer calls between accumulation micro-steps, as with DDP
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    model.no_sync = no_sync
    return model


def _average_grad(p: torch.Tensor) -> None:
    dist.all_reduce(p.grad)
    p.grad /= dist.get_world_size()


class _Full:
    """Something with .state_dict(): what save_checkpoint reads from the model and the optimizer."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def full_state(model, optimizer) -> tuple[_Full, _Full]:
    """Full (unsharded, CPU) model and optimizer states, gathered by every process (a collective)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (_Full(get_model_state_dict(model, options=opts)),
            _Full(get_optimizer_state_dict(model, optimizer, options=opts)))


def load_full_state(model, optimizer, weights: dict, optim_state: dict) -> None:
    """Load a checkpoint's full weights and (name-keyed) optimizer state into a sharded model."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    if not all(isinstance(k, str) for k in optim_state.get("state", {})):
        raise ConfigError("this checkpoint's optimizer state was saved without --fsdp (keyed by position): "
                          "resume it without --fsdp")
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
