"""Atomic checkpoints: a run killed at any moment resumes from its last complete checkpoint.

A checkpoint is written to `checkpoint.tmp/` and swapped in with renames, so `checkpoint/` is always
whole. Tensors are stored with safetensors or loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint"
ROLLOUTS = "rollouts.json"  # the in-flight batches of an off-policy run (popo_core/rollout/source.py)


def _float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save(
    output_dir: Path,
    *,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: dict[str, Any],
    momentum=None,
    predictor=None,
    base_name: str | None = None,
    rollouts: dict | None = None,
) -> Path:
    from safetensors.torch import save_file

    from popo_core.model.loading import save_policy

    final, tmp, old = output_dir / CHECKPOINT, output_dir / f"{CHECKPOINT}.tmp", output_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_policy(model, tokenizer, tmp / "policy", base_name=base_name)
    if momentum is not None:  # a popo_core.trainer.companions companion: a full copy or the momentum adapter
        save_file(momentum.state_dict(), tmp / "momentum.safetensors")
    if predictor is not None:
        save_file(_float_state(predictor), tmp / "predictor.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "optim.pt")
    if rollouts:  # batches sampled from older weights than these (rollout.max_staleness > 0)
        (tmp / ROLLOUTS).write_text(json.dumps(rollouts))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # a kill during the last save's clean-up can leave one
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _restore_policy(model, policy_dir: Path, device) -> None:
    from safetensors.torch import load_file

    from popo_core.model.lora import POLICY, is_peft

    if is_peft(model):  # a LoRA run: the frozen base is rebuilt; the adapter is what trained
        from peft import set_peft_model_state_dict

        keys = set_peft_model_state_dict(model, load_file(str(policy_dir / "adapter_model.safetensors"), device=str(device)),
                                         adapter_name=POLICY)
        missing = [k for k in keys.missing_keys if f".{POLICY}." in k and "lora_" in k]
        if keys.unexpected_keys or missing:
            raise RuntimeError(f"checkpoint does not match the adapter: {(keys.unexpected_keys or missing)[:3]}")
        return
    policy: dict[str, torch.Tensor] = {}
    for shard in sorted(policy_dir.glob("*.safetensors")):
        policy.update(load_file(str(shard), device=str(device)))
    # strict=False: tied output embeddings are saved once, under the input embedding's name; any
    # other missing or unexpected key is an error, never a weight left at its initial value.
    keys = model.load_state_dict(policy, strict=False)
    missing = [k for k in keys.missing_keys if not _tied_to_loaded(model, k, policy)]
    if keys.unexpected_keys or missing:
        which = f"unexpected keys {keys.unexpected_keys[:3]}" if keys.unexpected_keys else f"missing keys {missing[:3]}"
        raise RuntimeError(f"checkpoint does not match the model: {which}")


def _tied_to_loaded(model, key: str, loaded: dict) -> bool:
    """Does parameter `key` share its storage with one that was loaded (tied embeddings)?"""
    state = model.state_dict(keep_vars=True)
    ptr = state[key].data_ptr()
    return any(state[k].data_ptr() == ptr for k in loaded if k in state)


def exists(output_dir: Path) -> bool:
    path = output_dir / CHECKPOINT
    if not path.exists() and (output_dir / f"{CHECKPOINT}.old").exists():
        # Killed between the two renames: the previous checkpoint is whole.
        (output_dir / f"{CHECKPOINT}.old").rename(path)
    return (path / "state.json").exists()


def load_state(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / CHECKPOINT / "state.json").read_text())


def load_rollouts(output_dir: Path) -> dict:
    """The in-flight batches a checkpoint holds ({} for a synchronous run's)."""
    path = output_dir / CHECKPOINT / ROLLOUTS
    return json.loads(path.read_text()) if path.exists() else {}


def restore(output_dir: Path, *, model, optimizer, scheduler, momentum=None, predictor=None) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and RNG state in place; return the trainer state."""
    from safetensors.torch import load_file

    path = output_dir / CHECKPOINT
    device = next(model.parameters()).device
    _restore_policy(model, path / "policy", device)
    if momentum is not None:
        momentum.load_state_dict(load_file(str(path / "momentum.safetensors"), device=str(device)))
    if predictor is not None:
        predictor.load_state_dict(load_file(str(path / "predictor.safetensors"), device=str(device)))
    blob = torch.load(path / "optim.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"].cpu())
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in blob["rng"]["cuda"]])
    return load_state(output_dir)


# ------------------------------------------------------------------------------------ sharded
def save_sharded(output_dir: Path, *, ranks, model, optimizer, scheduler, state: dict[str, Any], momentum=None,
                 predictor=None) -> Path:
    """The same atomic checkpoint for an FSDP2 run: every rank writes its shards of the policy,
    the optimizer and the momentum network with torch.distributed.checkpoint (DCP) into
    `checkpoint.tmp/`, and rank 0 swaps it in once every rank is done. Resumes on the same
    number of ranks."""
    import torch.distributed.checkpoint as dcp

    final, tmp, old = output_dir / CHECKPOINT, output_dir / f"{CHECKPOINT}.tmp", output_dir / f"{CHECKPOINT}.old"
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    stepped = bool(optimizer.state)  # alike on every rank: all take the same optimizer steps
    content = _dcp_content(model, optimizer if stepped else None, momentum, predictor)
    dcp.save(content, checkpoint_id=str(tmp / "dcp"))
    torch.save({"cpu": torch.get_rng_state()}, tmp / f"rng-{ranks.rank}.pt")
    ranks.barrier()
    if ranks.main:
        blob = {"scheduler": scheduler.state_dict(), "world_size": ranks.world}
        if not stepped:  # no state yet, as on one process: only the parameter groups (the same on every rank)
            blob["optimizer"] = optimizer.state_dict()
        torch.save(blob, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


def _dcp_content(model, optimizer, momentum, predictor) -> dict[str, Any]:
    """What a sharded checkpoint holds, as DCP saves and loads it (in place). `optimizer` is None
    before the first optimizer step: DCP's get_state_dict would initialise an empty AdamW state
    with a zero-gradient step, its step counter at 1, which shifts every later update's bias
    correction (and the 1-process run has no such step)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        content = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        content = {"model": model_state, "optim": optim_state}
    if momentum is not None:
        content["momentum"] = momentum.sharded_state_dict()
    if predictor is not None:
        content["predictor"] = predictor.state_dict()
    return content


def restore_sharded(output_dir: Path, *, ranks, model, optimizer, scheduler, momentum=None,
                    predictor=None) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = output_dir / CHECKPOINT
    blob = torch.load(path / "scheduler.pt", weights_only=True)
    if blob["world_size"] != ranks.world:
        from popo_core.errors import ConfigError

        raise ConfigError(f"trainer.output_dir={output_dir}: its checkpoint was written by {blob['world_size']} "
                          f"process(es); resume it with --nproc-per-node {blob['world_size']}")
    stepped = "optimizer" not in blob  # saved before the first optimizer step: no state to load
    content = _dcp_content(model, optimizer if stepped else None, momentum, predictor)
    dcp.load(content, checkpoint_id=str(path / "dcp"))
    if stepped:
        set_state_dict(model, optimizer, model_state_dict=content["model"], optim_state_dict=content["optim"])
    else:
        set_model_state_dict(model, content["model"])
        optimizer.load_state_dict(blob["optimizer"])
    if momentum is not None:
        momentum.module.load_state_dict(content["momentum"])
    if predictor is not None:
        predictor.load_state_dict(content["predictor"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(torch.load(path / f"rng-{ranks.rank}.pt", weights_only=True)["cpu"])
    return load_state(output_dir)
