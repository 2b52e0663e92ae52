"""Atomic checkpoints (popo_core/trainer/checkpoint.py) on the tiny model, directly.

A checkpoint restores the policy, optimizer, scheduler, momentum network, predictor and RNG state
bit for bit (the next step is the same step); a run killed between the two renames finds its
previous checkpoint whole; a save that fails half way leaves the last checkpoint in place; weights
are safetensors and the one pickle (optim.pt) is read with weights_only, so a crafted file cannot
run code. (Through the whole loop: tests/trainer/test_loop.py, test_crash_and_resume_equals_uninterrupted_run.)
"""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from popo_core.algo.siamese import Predictor
from popo_core.config import ConfigError
from popo_core.trainer import checkpoint
from popo_core.trainer.companions import FullCopy
from popo_core.trainer.distributed import Ranks
from helpers import tiny_model, token_ids

STATE = {"step": 2, "run_id": None, "history": [{"step": 1, "reward/mean": 0.25}], "counters": {"updates": 4}}


def parts(seed: int = 0, *overrides: str) -> SimpleNamespace:
    """What a run checkpoints, built as popo_core.trainer.loop.build builds it (AdamW, a warm-up LambdaLR)."""
    model, tokenizer = tiny_model(seed, *overrides)
    torch.manual_seed(seed)
    predictor = Predictor(model.config.hidden_size)
    optimizer = torch.optim.AdamW([*model.parameters(), *predictor.parameters()], lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    return SimpleNamespace(model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                           momentum=FullCopy(model), predictor=predictor)


def step_(p: SimpleNamespace, n: int = 1) -> None:
    """n optimizer steps that move every part: policy, predictor, AdamW moments, scheduler, momentum."""
    ids = token_ids()
    for _ in range(n):
        out = p.model(ids, labels=ids, output_hidden_states=True)
        (out.loss + p.predictor(out.hidden_states[-1]).pow(2).mean()).backward()
        p.optimizer.step()
        p.optimizer.zero_grad()
        p.scheduler.step()
        p.momentum.update_(p.model, 0.9)


def save(out, p: SimpleNamespace, state=STATE):
    return checkpoint.save(out, model=p.model, tokenizer=p.tokenizer, optimizer=p.optimizer, scheduler=p.scheduler,
                           state=state, momentum=p.momentum, predictor=p.predictor, base_name="tiny")


def restore(out, p: SimpleNamespace):
    return checkpoint.restore(out, model=p.model, optimizer=p.optimizer, scheduler=p.scheduler, momentum=p.momentum,
                              predictor=p.predictor)


def same(a, b) -> bool:
    """Bitwise equality of nested state dicts (tensors, numbers, lists, dicts)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def everything(p: SimpleNamespace) -> dict:
    return {"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
            "momentum": p.momentum.state_dict(), "predictor": p.predictor.state_dict()}


# ---------------------------------------------------------------------------------- round trip
def test_save_then_restore_is_exact(tmp_path):
    a = parts(seed=0)
    step_(a, 2)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    save(tmp_path, a)
    drawn = torch.rand(8)  # what the run would draw next
    b = parts(seed=1)  # another initialisation, no optimizer state, scheduler at its start
    for key, value in everything(a).items():
        assert not same(value, everything(b)[key]), key  # so the comparison below can fail
    assert restore(tmp_path, b) == STATE
    for key, value in everything(a).items():
        assert same(value, everything(b)[key]), key
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(torch.rand(8), drawn)
    assert b.model.lm_head.weight is b.model.model.embed_tokens.weight  # the tie survives the load
    # The next step from the restored parts is the next step of the original, bit for bit.
    step_(a)
    step_(b)
    assert same(everything(a), everything(b))


def test_weights_are_safetensors_and_the_optimizer_loads_weights_only(tmp_path):
    from safetensors.torch import load_file

    p = parts()
    step_(p)
    final = save(tmp_path, p)
    assert final == tmp_path / "checkpoint"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint"]  # no .tmp or .old left behind
    files = {f.relative_to(final).as_posix() for f in final.rglob("*") if f.is_file()}
    assert {"policy/model.safetensors", "momentum.safetensors", "predictor.safetensors", "optim.pt", "state.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl")) and f != "optim.pt"]
    policy = load_file(str(final / "policy" / "model.safetensors"))
    assert torch.equal(policy["model.embed_tokens.weight"], p.model.model.embed_tokens.weight)
    assert same(load_file(str(final / "momentum.safetensors")), p.momentum.state_dict())
    assert same(load_file(str(final / "predictor.safetensors")), p.predictor.state_dict())
    blob = torch.load(final / "optim.pt", weights_only=True)
    assert same(blob["optimizer"], p.optimizer.state_dict()) and blob["scheduler"] == p.scheduler.state_dict()
    assert json.loads((final / "state.json").read_text()) == checkpoint.load_state(tmp_path) == STATE


SPRUNG: list[str] = []


def _spring():
    SPRUNG.append("code ran")
    return {}


class Trap:
    """Pickles as a call of _spring: what a crafted optim.pt could make a full unpickler do."""

    def __reduce__(self):
        return (_spring, ())


def test_a_crafted_optimizer_file_cannot_run_code(tmp_path):
    p = parts()
    save(tmp_path, p)
    trap = tmp_path / "checkpoint" / "optim.pt"
    torch.save({"optimizer": Trap(), "scheduler": {}, "rng": {"cpu": torch.get_rng_state()}}, trap)
    SPRUNG.clear()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        restore(tmp_path, parts())
    assert SPRUNG == []
    torch.load(trap, weights_only=False)  # the counter-check: a full unpickler does run it
    assert SPRUNG == ["code ran"]


@pytest.mark.parametrize("layers, which", [(3, "missing keys"), (1, "unexpected keys")])
def test_a_checkpoint_of_another_model_is_refused(tmp_path, layers, which):
    save(tmp_path, parts())
    with pytest.raises(RuntimeError, match=f"checkpoint does not match the model: {which}"):
        restore(tmp_path, parts(0, f"model.num_layers={layers}"))


# --------------------------------------------------------------------------------- atomicity
def test_killed_between_the_renames_the_previous_checkpoint_is_found(tmp_path):
    p = parts()
    save(tmp_path, p, STATE | {"step": 1})
    # save() renames checkpoint/ to checkpoint.old/, then checkpoint.tmp/ to checkpoint/: killed in between.
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "optim.pt").write_bytes(b"half written")
    assert checkpoint.exists(tmp_path)
    assert not (tmp_path / "checkpoint.old").exists()
    assert checkpoint.load_state(tmp_path)["step"] == 1
    assert restore(tmp_path, parts(seed=1))["step"] == 1  # whole: it restores
    save(tmp_path, p, STATE | {"step": 2})  # the next save clears the half-written one
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint"]
    assert checkpoint.load_state(tmp_path)["step"] == 2


def killed_before_the_old_one_is_removed(tmp_path, p) -> None:
    """save() swapped the new checkpoint in and was killed before (or while) removing checkpoint.old/."""
    save(tmp_path, p, STATE | {"step": 2})
    elsewhere = tmp_path.parent / f"{tmp_path.name}-previous"
    save(elsewhere, p, STATE | {"step": 1})
    (elsewhere / "checkpoint").rename(tmp_path / "checkpoint.old")


def test_killed_before_the_old_one_is_removed_the_new_one_wins(tmp_path):
    p = parts()
    killed_before_the_old_one_is_removed(tmp_path, p)
    assert checkpoint.exists(tmp_path) and checkpoint.load_state(tmp_path)["step"] == 2
    assert restore(tmp_path, parts(seed=1))["step"] == 2


def test_killed_before_the_old_one_is_removed_the_next_save_succeeds(tmp_path):
    p = parts()
    killed_before_the_old_one_is_removed(tmp_path, p)
    assert checkpoint.exists(tmp_path)
    save(tmp_path, p, STATE | {"step": 3})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint"]
    assert checkpoint.load_state(tmp_path)["step"] == 3


def test_a_save_that_fails_half_way_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    p = parts()
    save(tmp_path, p, STATE | {"step": 1})
    before = (tmp_path / "checkpoint" / "optim.pt").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)  # after the weights, before optim.pt and state.json
    step_(p)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, p, STATE | {"step": 2})
    monkeypatch.undo()
    assert checkpoint.exists(tmp_path) and checkpoint.load_state(tmp_path)["step"] == 1
    assert (tmp_path / "checkpoint" / "optim.pt").read_bytes() == before


def test_no_checkpoint_is_no_checkpoint(tmp_path):
    assert not checkpoint.exists(tmp_path)
    (tmp_path / "checkpoint").mkdir()  # a directory without state.json is not a checkpoint
    assert not checkpoint.exists(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint"]


# ----------------------------------------------------------------------------------- sharded
def test_a_sharded_checkpoint_resumes_only_on_its_number_of_ranks(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    torch.save({"scheduler": {}, "world_size": 2}, tmp_path / "checkpoint" / "scheduler.pt")
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\); resume it with --nproc-per-node 2"):
        checkpoint.restore_sharded(tmp_path, ranks=Ranks(rank=0, world=1), model=None, optimizer=None, scheduler=None)


@pytest.fixture
def one_rank_fsdp():
    """FSDP2 on a gloo group of one process: the sharded checkpoint's code path (DCP, DTensors)
    without torchrun."""
    dist = torch.distributed
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Ranks(rank=0, world=1)
    finally:
        dist.destroy_process_group()


def sharded_parts(seed: int) -> SimpleNamespace:
    from popo_core.trainer.distributed import shard

    p = parts(seed)
    shard(p.model, torch.float32)
    p.optimizer = torch.optim.AdamW(p.model.parameters(), lr=1e-2, weight_decay=0.01)
    p.scheduler = torch.optim.lr_scheduler.LambdaLR(p.optimizer, lambda s: min(1.0, (s + 1) / 5))
    return p


def sharded_step(p: SimpleNamespace) -> None:
    # Through the backbone, an FSDP root of its own (popo never calls the tied head: distributed.shard).
    p.model.model(token_ids()).last_hidden_state.pow(2).mean().backward()
    p.optimizer.step()
    p.optimizer.zero_grad()
    p.scheduler.step()


def local_state(p: SimpleNamespace) -> dict:
    """The model and optimizer state, DTensors as their local shards (bitwise comparable)."""
    from popo_core.trainer.distributed import local

    def unwrap(x):
        if isinstance(x, dict):
            return {k: unwrap(v) for k, v in x.items()}
        if isinstance(x, list):
            return [unwrap(v) for v in x]
        return local(x).detach().clone() if isinstance(x, torch.Tensor) else x

    return unwrap({"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
                   "scheduler": p.scheduler.state_dict()})


@pytest.mark.parametrize("steps", [0, 2], ids=["before-the-first-step", "after-two-steps"])
def test_a_sharded_checkpoint_changes_nothing_and_resumes_exactly(tmp_path, one_rank_fsdp, steps):
    """Saving changes nothing, and the restored run takes the same next step, bit for bit. Before
    the first optimizer step DCP's get_state_dict would initialise AdamW's state with a zero-grad
    step (its step counter at 1, every later update's bias correction shifted): the optimizer
    holds no state then, as on one process, and none is saved."""
    a = sharded_parts(seed=0)
    for _ in range(steps):
        sharded_step(a)
    before = local_state(a)
    checkpoint.save_sharded(tmp_path, ranks=one_rank_fsdp, model=a.model, optimizer=a.optimizer,
                            scheduler=a.scheduler, state=STATE)
    assert same(local_state(a), before)  # the save moved nothing, the optimizer's state included
    b = sharded_parts(seed=1)
    assert not same(local_state(b)["model"], before["model"])  # so the comparison below can fail
    assert checkpoint.restore_sharded(tmp_path, ranks=one_rank_fsdp, model=b.model, optimizer=b.optimizer,
                                      scheduler=b.scheduler) == STATE
    assert same(local_state(b), before)
    sharded_step(a)
    sharded_step(b)
    assert same(local_state(a), local_state(b))
    assert int(a.optimizer.state_dict()["state"][0]["step"]) == steps + 1  # one AdamW step per step taken
