"""vLLM inside a torchrun job, colocated with the FSDP2 trainer (measured on CPU: docs/vllm.md).

Every rank starts its own engine with vLLM's `external_launcher` backend, which joins the process
group the trainer already created (the default group, over gloo or NCCL) and builds its own
subgroups on it; with rollout.tensor_parallel_size=k the ranks form groups of k consecutive ranks
that run one engine together. The trainer keeps no unsharded copy of the policy: each push gathers
one tensor at a time from the FSDP2 shards (`full_tensor()`) and hands it to vLLM's loader, which
frees it once its layer is loaded, so at most about one layer is whole in memory at once.

vLLM's engine shutdown destroys the default process group (the trainer's): `shutdown` stops the
engine and leaves that group to the trainer.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

from popo_core.errors import ConfigError


def check_groups(world: int, tensor_parallel_size: int, key: str = "rollout.tensor_parallel_size") -> None:
    """One-line ConfigError unless the engines' groups tile the ranks."""
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ConfigError(f"{key}={tensor_parallel_size}: must divide the number of processes ({world}); "
                          f"each group of {key} ranks runs one engine")


def launcher_args(world: int) -> dict:
    """The LLM(...) arguments of an engine started in one rank of a torchrun job (none alone)."""
    return {"distributed_executor_backend": "external_launcher"} if world > 1 else {}


@dataclass
class PushStats:
    """What the last push held whole at once: the bound on its extra memory."""

    tensors: int = 0
    total_bytes: int = 0  # every tensor pushed, whole
    peak_bytes: int = 0  # most bytes of gathered (whole) tensors alive at the same time
    live_bytes: int = 0


def gathered(named: Iterable[tuple[str, object]], stats: PushStats) -> Iterator[tuple[str, object]]:
    """(name, whole tensor) pairs, each gathered from its shards only when the loader asks for it.

    A gathered tensor is counted alive until it is freed (the loader copies it into its layer and
    drops it), so `stats.peak_bytes` is what the push held whole at once. A tensor that is not
    sharded is passed as it is (nothing gathered, nothing counted)."""
    import torch

    from popo_core.trainer import distributed

    for name, tensor in named:
        with torch.no_grad():
            whole = distributed.full(tensor)  # the very tensor vLLM gets (no detached view to outlive it)
        sharded = whole is not tensor
        stats.tensors += 1
        size = whole.numel() * whole.element_size()
        stats.total_bytes += size
        if sharded:
            stats.live_bytes += size
            stats.peak_bytes = max(stats.peak_bytes, stats.live_bytes)
            weakref.finalize(whole, _freed, stats, size)
        yield name, whole
        del whole


def _freed(stats: PushStats, size: int) -> None:
    stats.live_bytes -= size


def drain(pairs: Iterator) -> int:
    """Gather what a failed or partial load left: every rank gathers every tensor exactly once, so
    the collectives stay matched whatever failed on one rank. Returns how many were left."""
    left = 0
    for _ in pairs:
        left += 1
    return left


@contextmanager
def default_group_kept() -> Iterator[None]:
    """vLLM's shutdown ends with `torch.distributed.destroy_process_group()`: under torchrun that
    group is the trainer's. Within this block only its own groups are destroyed."""
    import torch.distributed as dist

    real = dist.destroy_process_group

    def destroy(group=None):
        if group is not None:
            real(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = real


def shutdown(llm) -> None:
    """Stop an in-process engine now (its memory, its subgroups), keeping the trainer's process group."""
    with default_group_kept():
        llm.llm_engine.engine_core.shutdown()
