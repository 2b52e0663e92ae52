"""Several processes (torchrun): FSDP2 sharding and the few rules that keep ranks in step.

Launched the standard way, `torchrun --nproc-per-node N -m popo_cli train PRESET`, every rank runs
the same loop on the same global batch: the step's prompts are drawn from the seeded sequence and
split by rank for generation, the rollouts are gathered again, the step's quantities (advantages,
normalisers) are computed over the whole batch on every rank, and each rank forwards its share of
the completions. FSDP2 averages gradients over ranks, so each rank's loss is scaled by N and the
gradient equals the single-process one. Every collective must be called the same number of times
on every rank: a rank whose share runs out early forwards a placeholder row with weight zero.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def chunks(self, items: Tensor, size: int) -> list[Tensor]:
        """This rank's share of `items` in chunks of at most `size`, as many on every rank (the
        last ones of a smaller share are empty)."""
        lo, hi = self.bounds(len(items))
        mine = items[lo:hi]
        count = math.ceil(math.ceil(len(items) / self.world) / size) if len(items) else 0
        return [mine[k * size : (k + 1) * size] for k in range(count)]

    def sum_(self, t: Tensor) -> Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


SINGLE = Ranks()


def from_env(device: str = "auto") -> tuple[Ranks, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else stay single. Returns the
    ranks and the device this rank trains on (its LOCAL_RANK's GPU, or the CPU over gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    dist = torch.distributed
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def shard(model, compute_dtype: torch.dtype):
    """FSDP2 over each decoder layer, the backbone (embeddings, final norm) and an untied LM head:
    fp32 sharded masters; with bf16 compute a MixedPrecisionPolicy casts parameters to bf16 for
    forward/backward and reduces gradients in fp32. popo calls the backbone and the head itself
    (the head only at completion positions), so each is its own FSDP root; a tied head reads the
    backbone's gathered embedding (popo_core/trainer/logprobs.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    for layer in backbone.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(backbone, mp_policy=policy)
    if getattr(base.config, "tie_word_embeddings", False):
        # fully_shard replaced the embedding's parameter: tie the head to the new one again, so
        # the policy has one such parameter (the head itself is never called, see above).
        base.get_output_embeddings().weight = backbone.get_input_embeddings().weight
    else:
        fully_shard(base.get_output_embeddings(), mp_policy=policy)
    return model


def local(t: Tensor) -> Tensor:
    """A parameter's local shard (the tensor itself when not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor, gathered from its shards (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model) -> dict[str, Tensor]:
    """Every parameter and buffer whole, on every rank (collective)."""
    return {k: full(v).detach() for k, v in model.state_dict().items()}


def reshard(model) -> None:
    """Back to sharded parameters after a forward without backward (FSDP2 keeps a root's
    parameters unsharded after its forward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def whole_on_main(model, ranks: Ranks):
    """The policy as one whole module on rank 0, None on the others (a collective): the full state
    dict gathered onto rank 0's CPU, loaded into a module built without initialising its weights.
    What the final save writes when no rank keeps a whole copy (vLLM samples)."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ranks.main:
        return None
    with torch.device("meta"):
        whole = type(model)(copy.deepcopy(model.config))
    whole.load_state_dict(state, strict=False, assign=True)
    whole.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        whole.generation_config = copy.deepcopy(model.generation_config)
    missing = [k for k, v in whole.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"gathered state dict lacks {missing[:3]}")
    return whole.eval()
