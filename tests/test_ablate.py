"""`popo ablate` (popo_core/ablate.py, popo_cli/ablate.py).

Each variant must change what METHOD.md's "Ablations" table says and nothing else: checked on the
resolved configs (against a table written here from METHOD.md, not read from ablations.yaml), on
the losses `build_objective` makes of them for one random batch, and on short training runs. Then
the command end to end: the table, the MLflow parent with nested runs, and a rerun that trains
nothing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import run_popo
from popo_core.ablate import (
    FULL,
    AblationError,
    Reporter,
    RunOutcome,
    aggregate,
    config_hash,
    describe,
    plan,
    run_ablation,
    variant_table,
)
from popo_core.config import compose, to_flat_dict
from popo_core.algo.objective import build_objective
from popo_core.algo.siamese import kl_penalty, similarity_penalty

F64 = torch.float64
INF = float("inf")
# METHOD.md, "Ablations", in its order: the keys each `--drop X` changes and their new values.
METHOD_TABLE = {
    "siamese": {"algo.siamese": False},
    "momentum": {"algo.momentum": 1.0},
    "similarity": {"algo.penalty": "kl"},
    "bound": {"algo.clip_eps": INF},
    "redistribution": {"algo.redistribution": "none", "algo.aggregation": "token_mean"},
    "positive-only": {"algo.use_negatives": True},
}
# Set per run by the ablation (where it writes, what it is called), so they differ by design.
PER_RUN = {"trainer.output_dir", "tracking.run_name"}
SHORT = ["trainer.max_steps=8", "trainer.eval_every=4", "rollout.prompts_per_step=6", "rollout.group_size=4",
         "trainer.save_every=4"]


def flat(cfg) -> dict:
    return {k: v for k, v in to_flat_dict(cfg).items() if k not in PER_RUN}


@pytest.fixture(scope="module")
def every_variant():
    """{name: AlgoConfig} of full POPO, every component and GRPO, resolved from the tiny preset."""
    ablation = plan("tiny", ["all"], 1, "grpo")
    return {r.variant.name: r.cfg for r in ablation.runs}


# ------------------------------------------------------------------------------------ configs
def test_variant_table_is_methods_table_in_order():
    assert list(variant_table()) == list(METHOD_TABLE)


def test_any_registered_method_is_a_baseline_and_baselines_repeat():
    ablation = plan("tiny", ["siamese"], 1, ["grpo", "psr", "nsr", "psr"])
    names = [v.name for v in ablation.variants]
    assert names == [FULL, "drop-siamese", "grpo", "psr", "nsr"]
    by = {r.variant.name: r.cfg for r in ablation.runs}
    assert by["psr"].algo.name == "psr" and by["nsr"].algo.name == "nsr"
    assert by["psr"].trainer.max_steps == by[FULL].trainer.max_steps  # the same budget
    for name in ("dr_grpo", "rft", "raft_pp", "w_reinforce"):
        assert [v.name for v in plan("tiny", [], 1, [name]).variants] == [FULL, name]


def test_a_baseline_its_settings_cannot_run_is_refused_in_the_plan():
    with pytest.raises(AblationError, match="grpo: rollout.group_size=1"):
        plan("tiny", [], 1, ["grpo"], ["rollout.group_size=1"])


@pytest.mark.parametrize("component", list(METHOD_TABLE))
@pytest.mark.parametrize("base", [[], ["algo.clip_eps=0.3", "trainer.max_steps=7", "optim.lr=2e-3"]])
def test_each_variant_changes_exactly_its_keys(component, base):
    ablation = plan("tiny", [component], 2, overrides=base)
    for seed in range(2):
        full, variant = (flat(r.cfg) for r in ablation.runs if r.seed == seed)
        changed = {k: variant[k] for k in full if variant[k] != full[k]}
        assert changed == METHOD_TABLE[component]
        assert full["trainer.seed"] == variant["trainer.seed"] == seed
    # Full POPO is the preset with the user's overrides, nothing removed.
    assert flat(ablation.runs[0].cfg) == flat(compose("tiny", [*base, "trainer.seed=0"]))


def test_drop_all_with_grpo_baseline_pairs_seeds_and_keeps_the_budget(every_variant):
    ablation = plan("tiny", ["bound", "all", "bound"], 3, "grpo")
    names = [v.name for v in ablation.variants]
    assert names == [FULL] + [f"drop-{c}" for c in METHOD_TABLE] + ["grpo"]
    for v in ablation.variants:
        assert [r.cfg.trainer.seed for r in ablation.runs_of(v.name)] == [0, 1, 2]
    full, grpo = flat(every_variant[FULL]), flat(every_variant["grpo"])
    assert grpo["algo.name"] == "grpo" and not grpo["algo.siamese"]
    budget = [k for k in full if k.startswith(("trainer.", "rollout.", "optim.", "model.", "data."))]
    budget += ["algo.epochs", "algo.mini_batches", "algo.clip_eps", "algo.aggregation"]
    assert {k: grpo[k] for k in budget} == {k: full[k] for k in budget}


def test_config_hash_ignores_tracking_and_output_dir_only(tmp_path):
    cfg = compose("tiny")
    h = config_hash(cfg)
    cfg.tracking.experiment, cfg.tracking.uri, cfg.trainer.output_dir = "other", "sqlite:///x.db", "elsewhere"
    assert config_hash(cfg) == h
    for override in ("trainer.seed=1", "trainer.max_steps=401", "algo.momentum=0.98", "rollout.group_size=4"):
        assert config_hash(compose("tiny", [override])) != h, override


def test_plan_is_deterministic_and_names_dirs_by_hash(tmp_path):
    a = plan("tiny", ["siamese", "bound"], 2, overrides=SHORT, root=tmp_path)
    b = plan("tiny", ["bound", "siamese"], 2, overrides=SHORT, root=tmp_path)
    assert a.key == b.key and a.output_dir == b.output_dir
    assert [r.cfg.trainer.output_dir for r in a.runs] == [r.cfg.trainer.output_dir for r in b.runs]
    for r in a.runs:
        assert r.cfg.trainer.output_dir == str(tmp_path / "tiny" / f"{r.variant.name}-seed{r.seed}-{r.config_hash}")
    assert len({r.config_hash for r in a.runs}) == len(a.runs)
    assert plan("tiny", ["siamese", "bound"], 3, overrides=SHORT, root=tmp_path).key != a.key


@pytest.mark.parametrize(
    "drops, seeds, baseline, overrides, message",
    [
        (["nonsense"], 2, None, [], "--drop nonsense: unknown component"),
        (["bound"], 0, None, [], "--seeds 0"),
        ([], 2, None, [], "nothing to compare"),
        (["bound"], 2, "ppo", [], "--baseline ppo: unknown baseline"),
        (["bound"], 2, None, ["trainer.seed=3"], "trainer.seed is set by popo ablate"),
        (["bound"], 2, None, ["trainer.output_dir=x"], "trainer.output_dir is set by popo ablate"),
        (["bound"], 2, None, ["algo=grpo"], "--baseline NAME"),
        (["bound"], 2, None, ["algo.name=grpo"], "--baseline NAME"),
        (["bound"], 2, "popo", [], "--baseline popo: unknown baseline"),
        (["momentum"], 2, None, ["algo.momentum=1.0"], "drop-momentum resolves to the same config as popo"),
    ],
)
def test_bad_input_is_refused_before_any_run(drops, seeds, baseline, overrides, message):
    with pytest.raises(AblationError, match=re.escape(message)):
        plan("tiny", drops, seeds, baseline, overrides)


# ------------------------------------------------------------------------------------- losses
def random_batch(seed: int = 0):
    """Four groups of three (mixed, one positive, all negative, all positive), lengths 2-5,
    ratios spread around 1 so some positive tokens are above the bound 1 + eps and some below."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1], dtype=F64)
    group_ids = torch.arange(4).repeat_interleave(3)
    lengths = torch.tensor([5, 2, 4, 3, 5, 2, 4, 3, 5, 2, 4, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    old = -(torch.rand(12, 5, generator=gen, dtype=F64) * 2 + 0.1)
    lp = (old + (torch.rand(12, 5, generator=gen, dtype=F64) - 0.5) * 1.2).requires_grad_(True)
    momentum_lp = old + 0.3 * torch.randn(12, 5, generator=gen, dtype=F64)
    return lp, old, mask, rewards, group_ids, momentum_lp


def policy_grad(objective, batch):
    lp, old, mask, rewards, group_ids, _ = batch
    lp.grad = None
    loss, _ = objective.policy_loss(lp, old, mask, rewards, group_ids)
    loss.backward()
    return loss.detach(), lp.grad.clone()


def test_bound_gives_gradient_above_the_bound(every_variant):
    batch = random_batch()
    lp, old, mask, rewards, *_ = batch
    eps = every_variant[FULL].algo.clip_eps
    above = mask & (rewards[:, None] > 0.5) & ((lp.detach() - old).exp() > 1 + eps)
    below = mask & (rewards[:, None] > 0.5) & ~above
    assert above.sum() >= 3 and below.sum() >= 3
    _, g_full = policy_grad(build_objective(every_variant[FULL].algo), batch)
    _, g_bound = policy_grad(build_objective(every_variant["drop-bound"].algo), batch)
    assert torch.all(g_full[above] == 0) and torch.all(g_full[below] != 0)
    assert torch.all(g_bound[above] != 0) and torch.all(g_bound[below] != 0)


def test_positive_only_gives_gradient_to_negatives(every_variant):
    batch = random_batch()
    negative = batch[2] & (batch[3][:, None] < 0.5)
    full, variant = (build_objective(every_variant[k].algo) for k in (FULL, "drop-positive-only"))
    assert full.method.forwards == "positives" and variant.method.forwards == "all"
    assert variant.name == "popo+negatives"
    _, g_full = policy_grad(full, batch)
    _, g_variant = policy_grad(variant, batch)
    assert torch.all(g_full[negative] == 0)
    assert g_variant[negative].abs().sum() > 0
    # The stabilisers stay: same bound, same siamese penalty, no reference model.
    assert variant.penalty_weight == full.penalty_weight and variant.penalty is full.penalty
    assert variant.siamese and not variant.needs.reference
    assert variant.method.penalty_rows == "positives"  # the penalty stays over the positives


def test_redistribution_is_one_mean_over_every_positive_token(every_variant):
    batch = random_batch()
    lp, old, mask, rewards, *_ = batch
    eps = every_variant[FULL].algo.clip_eps
    total, count = 0.0, 0
    for i in range(len(rewards)):
        if rewards[i] > 0.5:
            for t in range(int(mask[i].sum())):
                total += min(math.exp(float(lp[i, t].detach() - old[i, t])), 1 + eps)
                count += 1
    loss_variant, _ = policy_grad(build_objective(every_variant["drop-redistribution"].algo), batch)
    loss_full, _ = policy_grad(build_objective(every_variant[FULL].algo), batch)
    assert float(loss_variant) == pytest.approx(-total / count, rel=1e-12)
    assert abs(float(loss_full) - float(loss_variant)) > 1e-3


def test_similarity_uses_the_kl_penalty_on_momentum_logprobs(every_variant):
    lp, _, mask, rewards, _, momentum_lp = batch = random_batch()
    full, variant = (build_objective(every_variant[k].algo) for k in (FULL, "drop-similarity"))
    assert full.penalty.fn is similarity_penalty and full.penalty.reads == "hidden"
    assert variant.penalty.fn is kl_penalty and variant.penalty.reads == "logprobs"
    assert variant.penalty_weight == full.penalty_weight == every_variant[FULL].algo.penalty_weight > 0
    pos = rewards > 0.5
    value, _ = variant.penalty_fn()(lp[pos], momentum_lp[pos], mask[pos])
    per_completion = []
    for i in torch.nonzero(pos).flatten().tolist():
        n = int(mask[i].sum())
        # k3: exp(q) - q - 1 with q = log pi_xi - log pi_theta, token mean per completion.
        per_completion.append(sum(math.exp(q) - q - 1 for q in (momentum_lp[i, :n] - lp[i, :n]).tolist()) / n)
    assert float(value.detach()) == pytest.approx(sum(per_completion) / len(per_completion), rel=1e-12)
    value.backward()
    assert lp.grad[pos].abs().sum() > 0
    assert torch.equal(policy_grad(variant, batch)[0], policy_grad(full, batch)[0])


def test_siamese_has_no_penalty_and_no_momentum_network(every_variant):
    batch = random_batch()
    full, variant = (build_objective(every_variant[k].algo) for k in (FULL, "drop-siamese"))
    assert full.siamese and full.penalty is not None
    assert not variant.siamese and variant.penalty is None and variant.penalty_weight == 0
    assert torch.equal(policy_grad(variant, batch)[1], policy_grad(full, batch)[1])


def test_momentum_keeps_the_objective_and_only_freezes_the_copy(every_variant):
    full, variant = (build_objective(every_variant[k].algo) for k in (FULL, "drop-momentum"))
    assert variant.siamese and variant.penalty is full.penalty
    assert every_variant["drop-momentum"].algo.momentum == 1.0


# --------------------------------------------------------------------------- short training
def test_momentum_network_stays_at_the_initial_weights(tmp_path):
    """Two real steps of full POPO, drop-momentum and drop-siamese from the same initial policy."""
    from safetensors.torch import load_file

    from popo_core.model.loading import load_model_and_tokenizer
    from popo_core.trainer.loop import train

    budget = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=2", "trainer.diagnostics_every=0",
              "tracking.enabled=false"]
    ablation = plan("tiny", ["momentum", "siamese"], 1, overrides=budget, root=tmp_path)
    initial, _ = load_model_and_tokenizer(ablation.runs[0].cfg.model, device=torch.device("cpu"), seed=0)
    initial = initial.state_dict()
    saved = {}
    for run in ablation.runs:
        result = train(run.cfg)
        rows = [json.loads(line) for line in open(f"{result.output_dir}/metrics.jsonl")]
        assert all(r["positives/fraction"] > 0 for r in rows if "positives/fraction" in r)  # gradients happened
        ckpt = Path(result.output_dir) / "checkpoint"
        momentum = ckpt / "momentum.safetensors"
        saved[run.variant.name] = (load_file(str(ckpt / "policy" / "model.safetensors")),
                                   load_file(str(momentum)) if momentum.exists() else None)

    def differs(state):
        return any(not torch.equal(v, initial[k]) for k, v in state.items())

    for name in (FULL, "drop-momentum", "drop-siamese"):
        assert differs(saved[name][0]), f"{name}: the policy did not train"
    assert differs(saved[FULL][1])  # m = 0.99 follows the policy
    frozen = saved["drop-momentum"][1]
    assert frozen and all(torch.equal(v, initial[k]) for k, v in frozen.items())  # m = 1 stays put
    assert saved["drop-siamese"][1] is None  # no momentum network at all


# ----------------------------------------------------------------------------------- statistics
def test_differences_are_paired_by_seed():
    ablation = plan("tiny", ["bound"], 3)

    def outcome(variant, seed, acc, reward):
        history = [{"step": 0, "eval/accuracy": 0.0}, {"step": 5, "eval/accuracy": acc, "reward/mean": reward}]
        return RunOutcome(variant, seed, "h", None, "d", acc, reward, "trained", history)

    full_acc, drop_acc = [0.2, 0.5, 0.8], [0.1, 0.4, 0.7]  # large spread over seeds, constant per-seed gap
    outcomes = [outcome(FULL, s, a, 0.5) for s, a in enumerate(full_acc)]
    outcomes += [outcome("drop-bound", s, a, 0.4 + 0.1 * s) for s, a in enumerate(drop_acc)]
    full, drop = aggregate(ablation, outcomes)
    assert full.delta_accuracy is None
    assert full.accuracy.mean == pytest.approx(0.5) and full.accuracy.std == pytest.approx(0.3)
    assert drop.delta_accuracy.mean == pytest.approx(-0.1) and drop.delta_accuracy.std == pytest.approx(0.0, abs=1e-12)
    assert drop.delta_reward.mean == pytest.approx(0.0) and drop.delta_reward.std == pytest.approx(0.1)
    assert drop.curve == [(0, 0.0, 0.0), (5, pytest.approx(0.4), pytest.approx(0.3))]
    assert describe([0.3]).std is None and describe([0.3, None]).mean is None


# --------------------------------------------------------------------------------- resuming
class CrashAt(Reporter):
    """Kills the named run at a step after its first checkpoint."""

    def __init__(self, name, step):
        self.name, self.step = name, step

    def run_callbacks(self, run, index, total):
        from popo_core.trainer.lifecycle import Callbacks

        if run.name != self.name:
            return None
        crash_step = self.step

        class Crash(Callbacks):
            def on_step(self, step, metrics):
                if step == crash_step:
                    raise RuntimeError("simulated crash")

        return Crash()


def mlflow_client():
    # Explicit URI: mlflow's module-level tracking URI is process-global.
    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def mlflow_runs():
    client = mlflow_client()
    exp = client.get_experiment_by_name("popo")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_killed_run_resumes_from_its_checkpoint_under_the_same_parent(workdir):
    ablation = plan("tiny", ["bound"], 1, overrides=SHORT)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ablation(ablation, CrashAt("drop-bound-seed0", 6))  # checkpoint at step 4
    runs = {r.info.run_name: r for r in mlflow_runs()}
    assert runs["drop-bound-seed0"].info.status == "FAILED" and runs["popo-seed0"].info.status == "FINISHED"
    parent = runs[f"ablate-tiny-{ablation.key}"]
    assert parent.info.status == "FAILED"

    result = run_ablation(plan("tiny", ["bound"], 1, overrides=SHORT))
    assert [o.source for o in result.outcomes] == ["reused", "resumed"]
    assert result.parent_run_id == parent.info.run_id
    after = {r.info.run_name: r for r in mlflow_runs()}
    assert set(after) == set(runs)  # the resumed run continued its MLflow run; no new one
    assert after["drop-bound-seed0"].info.status == "FINISHED" and after[parent.info.run_name].info.status == "FINISHED"
    steps = [json.loads(line)["step"] for line in open(f"{result.outcomes[1].output_dir}/metrics.jsonl")]
    assert steps == list(range(9))  # 5 was redone after the crash, and logged once


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_ablate_cli_end_to_end_and_rerun_trains_nothing(workdir):
    args = ["ablate", "tiny", "--drop", "siamese", "--drop", "bound", "--seeds", "2", *SHORT]
    first = run_popo(*args, cwd=workdir)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    for text in ("popo (full)", "drop siamese", "drop bound", "eval/accuracy", "Δ accuracy (paired)", "trained 6 run(s)"):
        assert text in out, text
    runs = mlflow_runs()
    parents = [r for r in runs if "popo.ablation_key" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    assert len(children) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {(r.data.tags["popo.variant"], r.data.tags["popo.seed"]) for r in children} == {
        (v, str(s)) for v in (FULL, "drop-siamese", "drop-bound") for s in (0, 1)
    }
    artifacts = {a.path for a in mlflow_client().list_artifacts(parent.info.run_id)}
    assert {"summary.json", "summary.csv", "runs.csv", "accuracy.png", "curves.png"} <= artifacts

    key = parent.data.tags["popo.ablation_key"]
    summary_dir = workdir / "ablations" / "tiny" / f"ablation-{key}"
    summary = json.loads((summary_dir / "summary.json").read_text())
    per_run = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(open(summary_dir / "runs.csv"))}
    by_name = {v["name"]: v for v in summary["variants"]}
    for name in ("drop-siamese", "drop-bound"):
        diffs = [float(per_run[(name, s)]["final_accuracy"]) - float(per_run[(FULL, s)]["final_accuracy"]) for s in (0, 1)]
        assert by_name[name]["delta_accuracy"]["mean"] == pytest.approx(sum(diffs) / 2)
        assert f"{by_name[name]['accuracy']['mean']:.3f}" in out

    second = run_popo(*args, cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "nothing to train" in second.stdout and "drop bound" in second.stdout
    again = mlflow_runs()
    assert {r.info.run_id for r in again} == {r.info.run_id for r in runs}


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--drop", "nonsense"], "error: --drop nonsense: unknown component"),
        (["--drop", "bound", "--seeds", "0"], "error: --seeds 0: need at least 1 seed"),
        (["--drop", "bound", "algo.momentum=2"], "error: algo.momentum=2.0: must be in [0, 1]"),
        (["--drop", "bound", "algo.nonsense=1"], "error: "),
    ],
)
def test_ablate_cli_bad_input_is_one_line_exit_2(workdir, args, message):
    result = run_popo("ablate", "tiny", *args, cwd=workdir)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (workdir / "ablations").exists()
