"""One training run: rollout -> reward -> loss -> step -> momentum update -> log -> checkpoint."""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from popo_core import checkpoint
from popo_core.config import Config, ConfigError, to_flat_dict, to_yaml
from popo_core.data import Problem, prompt_ids
from popo_core.evaluate import evaluate_problems
from popo_core.models import load_model_and_tokenizer, resolve_device, save_policy
from popo_core.objective import Objective, build_objective
from popo_core.policy import collate, completion_forward
from popo_core.rewards import grade_counts, make_verifier
from popo_core.rollout import Rollouts, make_engine
from popo_core.siamese import Predictor, momentum_at, momentum_update_
from popo_core.tasks import load_task
from popo_core.tracking import Run

# Settings a resumed run may change: budget, cadence and where things are logged.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.eval_every", "trainer.save_every", "trainer.diagnostics_every",
                     "trainer.threads", "trainer.device", "trainer.resume", "trainer.output_dir")


class TrainingAborted(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class TrainResult:
    output_dir: str
    run_id: str | None
    step: int
    final_accuracy: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_complete: bool = False  # True when the run was already finished and nothing trained


class Callbacks:
    """Hooks for a progress display or an Optuna trial; `on_eval` may raise to stop the run."""

    def on_start(self, start_step: int, total_steps: int, output_dir: Path) -> None: ...

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, accuracy: float) -> None: ...


def default_output_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.preset}-{cfg.algo.name}-seed{cfg.trainer.seed}-{stamp}"


def prompt_batch(problems: list[Problem], step: int, size: int, seed: int) -> list[Problem]:
    """Prompts of a step: epochs of seeded permutations, a pure function of (seed, step) so a
    resumed run continues the same sequence."""
    out, n = [], len(problems)
    for i in range((step - 1) * size, step * size):
        epoch, pos = divmod(i, n)
        out.append(problems[_permutation(n, seed * 1_000_003 + epoch)[pos]])
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(n), n)


def frozen_copy(model):
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin.eval()


def pack_groups(rows: list[int], group_ids: list[int], limit: int) -> list[list[int]]:
    """Split rows into micro-batches of whole groups, each up to `limit` rows (one group may exceed)."""
    by_group: dict[int, list[int]] = {}
    for r in rows:
        by_group.setdefault(group_ids[r], []).append(r)
    batches, current = [], []
    for members in by_group.values():
        if current and len(current) + len(members) > limit:
            batches.append(current)
            current = []
        current = current + members
    if current:
        batches.append(current)
    return batches


class Trainer:
    """Holds the run's networks and state; `run()` is the loop."""

    def __init__(self, cfg: Config, callbacks: Callbacks | None = None):
        self.cfg = cfg
        self.cb = callbacks or Callbacks()
        self.output_dir = Path(cfg.trainer.output_dir) if cfg.trainer.output_dir else default_output_dir(cfg)
        self.resuming = self._check_output_dir()

    def _check_output_dir(self) -> bool:
        out, t = self.output_dir, self.cfg.trainer
        if checkpoint.exists(out):
            if not t.resume:
                raise ConfigError(f"trainer.output_dir={out}: holds a run; resume it (trainer.resume=true) or pick another dir")
            saved = checkpoint.load_state(out)["config"]
            current = to_flat_dict(self.cfg)
            diff = [k for k in current if not k.startswith("tracking.") and k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"trainer.output_dir={out}: holds a run with {k}={saved.get(k)}, not {current[k]}; pick another dir")
            return True
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"trainer.output_dir={out}: not empty and holds no checkpoint; pick another dir")
        return False

    # ----------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.trainer.seed)
        self.device = resolve_device(cfg.trainer.device)
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, device=self.device, seed=cfg.trainer.seed)
        self.model.train()
        self.train_set, self.eval_set = load_task(cfg)
        self.verifier = make_verifier(cfg.data.task)
        self.engine = make_engine(cfg.rollout.engine, self.model, self.tokenizer, seed=cfg.trainer.seed,
                                  gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                  trust_remote_code=cfg.model.trust_remote_code)
        self.suppress = getattr(self.engine, "suppress", [])
        self.pad_id = self.engine.pad_id
        self.objective: Objective = build_objective(cfg.algo)
        self.momentum_net = frozen_copy(self.model) if self.objective.needs_momentum else None
        self.reference = frozen_copy(self.model) if self.objective.needs_reference else None
        self.predictor = None
        if cfg.algo.predictor and self.objective.penalty_input == "hidden":
            self.predictor = Predictor(self.model.config.hidden_size).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.predictor is not None:
            self.params += list(self.predictor.parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
        warm = max(o.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        a = cfg.algo
        self.total_updates = cfg.trainer.max_steps * a.epochs * a.mini_batches
        self.state: dict[str, Any] = {"step": 0, "updates": 0, "nonfinite": 0, "skipped": 0, "run_id": None, "history": []}
        if self.resuming:
            self.state.update(
                checkpoint.restore(
                    self.output_dir,
                    model=self.model,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    momentum=self.momentum_net,
                    predictor=self.predictor,
                )
            )
        self.state["config"] = to_flat_dict(cfg)

    # -------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        cfg, out = self.cfg, self.output_dir
        result_file = out / "result.json"
        if self.resuming and result_file.exists():
            saved = json.loads(result_file.read_text())
            if saved["step"] >= cfg.trainer.max_steps:
                return TrainResult(**{**saved, "resumed_complete": True})
        self.setup()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        t = cfg.tracking
        tags = {"popo.preset": cfg.preset, "popo.algo": cfg.algo.name, "popo.output_dir": str(out.resolve())}
        run = Run(uri=t.uri, experiment=t.experiment, enabled=t.enabled, run_id=self.state["run_id"],
                  run_name=t.run_name or out.name, parent_run_id=t.parent_run_id, tags=tags)
        self.state["run_id"] = run.run_id
        if not self.resuming:
            params = to_flat_dict(cfg) | {"model.parameters": sum(p.numel() for p in self.model.parameters())}
            run.log_params(params)
            run.log_text(to_yaml(cfg), "config.yaml")
        start = self.state["step"]
        self.cb.on_start(start, cfg.trainer.max_steps, out)
        metrics: dict[str, float] = {}
        try:
            with open(out / "metrics.jsonl", "a") as log:
                if start == 0 and self.eval_set:
                    metrics = {"eval/accuracy": self._evaluate()}
                    self._record(run, log, 0, metrics)
                for step in range(start + 1, cfg.trainer.max_steps + 1):
                    metrics = self.step(step)
                    every = cfg.trainer.eval_every
                    if self.eval_set and (step == cfg.trainer.max_steps or (every and step % every == 0)):
                        metrics["eval/accuracy"] = self._evaluate()
                    self._record(run, log, step, metrics)
                    self.state["step"] = step
                    if step % cfg.trainer.save_every == 0 or step == cfg.trainer.max_steps:
                        self._save()
            return self._finish(run, metrics)
        except KeyboardInterrupt:
            run.finish("KILLED")
            raise
        except BaseException:
            run.finish("FAILED")
            raise

    def _record(self, run: Run, log, step: int, metrics: dict[str, float]) -> None:
        run.log_metrics(metrics, step)
        log.write(json.dumps({"step": step, **metrics}) + "\n")
        log.flush()
        keep = {k: metrics[k] for k in ("reward/mean", "eval/accuracy") if k in metrics}
        self.state["history"].append({"step": step, **keep})
        self.cb.on_step(step, metrics)
        if "eval/accuracy" in metrics:
            self.cb.on_eval(step, metrics["eval/accuracy"])

    def _save(self) -> None:
        checkpoint.save(self.output_dir, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                        scheduler=self.scheduler, state=self.state, momentum=self.momentum_net, predictor=self.predictor)

    def _finish(self, run: Run, metrics: dict[str, float]) -> TrainResult:
        from popo_core.plots import training_curves

        out = self.output_dir
        save_policy(self.model, self.tokenizer, out)
        history = self.state["history"]
        evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
        result = TrainResult(str(out), run.run_id, self.state["step"], evals[-1] if evals else None, metrics, history)
        (out / "result.json").write_text(json.dumps(asdict(result), indent=1))
        png = training_curves(history, out / "curves.png", title=f"{self.cfg.preset} / {self.cfg.algo.name}")
        run.log_artifact(png)
        run.log_artifact(out / "metrics.jsonl")
        if result.final_accuracy is not None:
            run.log_metrics({"final/accuracy": result.final_accuracy}, self.state["step"])
        run.finish("FINISHED")
        return result

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self) -> float:
        r = self.cfg.rollout
        report = evaluate_problems(
            self.engine, self.tokenizer, self.eval_set, self.verifier, template=self.cfg.model.template,
            max_new_tokens=r.eval_max_new_tokens or r.max_new_tokens, greedy=True, batch_prompts=256,
        )
        self.model.train()
        return report.accuracy

    # ---------------------------------------------------------------------------- one RL step
    def step(self, step: int) -> dict[str, float]:
        cfg, r = self.cfg, self.cfg.rollout
        t0 = time.perf_counter()
        problems = prompt_batch(self.train_set, step, r.prompts_per_step, cfg.trainer.seed)
        rollouts = self.engine.generate(prompt_ids(self.tokenizer, cfg.model.template, problems), n=r.group_size, temperature=r.temperature, top_p=r.top_p,
                                        max_new_tokens=r.max_new_tokens)
        t_gen = time.perf_counter()
        grades = self.verifier(rollouts.texts, [problems[g].answer for g in rollouts.group_ids])
        rewards = torch.tensor([float(g.correct) for g in grades], device=self.device)
        t_grade = time.perf_counter()

        metrics = self._update(step, rollouts, rewards)
        self.engine.sync_weights(self.model)
        t_end = time.perf_counter()

        groups = torch.tensor(rollouts.group_ids)
        per_group = torch.zeros(len(problems)).index_add(0, groups, rewards.cpu())
        n_tokens = sum(len(c) for c in rollouts.completion_ids)
        counts = grade_counts(grades)
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "positives/fraction": float((rewards > 0.5).float().mean()),
            "groups/no_positive_fraction": float((per_group == 0).float().mean()),
            "groups/all_positive_fraction": float((per_group == r.group_size).float().mean()),
            "completion/length": n_tokens / len(rollouts),
            "completion/truncated_fraction": sum(rollouts.truncated) / len(rollouts),
            "grading/timeouts": counts["timeout"],
            "grading/errors": counts["error"],
            "throughput/tokens_per_s": n_tokens / (t_end - t0),
            "time/generate_s": t_gen - t0,
            "time/grade_s": t_grade - t_gen,
            "time/update_s": t_end - t_grade,
            "time/step_s": t_end - t0,
        })
        return metrics

    def _forward(self, model, rollouts: Rollouts, rows: list[int], *, hidden=False, logprobs=True, grad=False):
        seqs = collate([rollouts.prompt_ids[i] for i in rows], [rollouts.completion_ids[i] for i in rows], self.pad_id, self.device)
        with torch.set_grad_enabled(grad):
            lp, h = completion_forward(model, seqs, temperature=self.cfg.rollout.temperature,
                                       suppress_ids=self.suppress, logprobs=logprobs, hidden=hidden)
        return seqs, lp, h

    def _logprobs(self, model, rollouts: Rollouts, rows: list[int]) -> dict[int, torch.Tensor]:
        """Per-row token log-probs under `model`, no gradient, in micro-batches."""
        out: dict[int, torch.Tensor] = {}
        for micro in pack_groups(rows, rollouts.group_ids, self.cfg.trainer.micro_batch_size):
            seqs, lp, _ = self._forward(model, rollouts, micro)
            for j, row in enumerate(micro):
                out[row] = lp[j, : int(seqs.mask[j].sum())]
        return out

    def _mean_logprob(self, rows: list[int], rollouts: Rollouts) -> float:
        lps = self._logprobs(self.model, rollouts, rows)
        return sum(float(lps[i].mean()) for i in rows) / len(rows)

    def _update(self, step: int, rollouts: Rollouts, rewards: torch.Tensor) -> dict[str, float]:
        """algo.epochs passes of algo.mini_batches optimizer steps over the rollout batch."""
        cfg, a, obj = self.cfg, self.cfg.algo, self.objective
        n = len(rollouts)
        correct = (rewards > 0.5).tolist()
        positive = [i for i in range(n) if correct[i]]
        negative = [i for i in range(n) if not correct[i]]
        rows = list(range(n)) if obj.forward_negatives else positive
        lengths = torch.tensor([len(c) for c in rollouts.completion_ids], device=self.device)
        group_t = torch.tensor(rollouts.group_ids, device=self.device)

        diag_every = cfg.trainer.diagnostics_every
        diagnose = bool(diag_every) and step % diag_every == 0 and bool(negative)
        before = self._mean_logprob(negative, rollouts) if diagnose else None

        single_update = a.epochs * a.mini_batches == 1
        # pi_old: the policy that generated the batch. With one update per batch the first
        # forward is at pi_old, so its detached log-probs serve (rho = 1 exactly).
        old = {} if single_update or not rows else self._logprobs(self.model, rollouts, rows)
        ref = self._logprobs(self.reference, rollouts, rows) if self.reference is not None and rows else {}

        sums: dict[str, float] = {}
        weight_total, forward_tokens, mismatch = 0.0, 0, []
        gen = torch.Generator().manual_seed(cfg.trainer.seed * 7919 + step)
        n_prompts = max(rollouts.group_ids) + 1
        for _ in range(a.epochs):
            order = torch.randperm(n_prompts, generator=gen).tolist()
            for chunk in (set(order[k :: a.mini_batches]) for k in range(a.mini_batches)):
                # One optimizer step on the groups in `chunk`, normalised as one batch (section 1).
                batch = [i for i in range(n) if rollouts.group_ids[i] in chunk]
                mb_rows = [i for i in rows if rollouts.group_ids[i] in chunk]
                norm_rows = torch.tensor(batch if obj.kind == "grpo" else mb_rows, dtype=torch.long, device=self.device)
                norms = obj.step_normalisers(rewards[norm_rows], group_t[norm_rows], lengths[norm_rows]) if mb_rows else {}
                n_pos = max(sum(correct[i] for i in mb_rows), 1)
                stats, finite = self._accumulate_gradients(rollouts, rewards, group_t, mb_rows, norms, n_pos, old, ref, mismatch)
                forward_tokens += sum(w for w, _ in stats)
                if self._optimizer_step(finite and bool(mb_rows), stats):
                    for weight, m in stats:
                        for k, v in m.items():
                            sums[k] = sums.get(k, 0.0) + weight * v
                    weight_total += sum(w for w, _ in stats)
        if not single_update and old:
            mismatch.append(_mismatch(torch.nn.utils.rnn.pad_sequence([old[i] for i in rows], batch_first=True),
                                      rollouts, rows, None))
        metrics = {k: v / weight_total for k, v in sums.items()} if weight_total else {}
        metrics.update({
            "train/forward_tokens": forward_tokens,
            "train/skipped_updates": self.state["skipped"],
            "train/updates": self.state["updates"],
            "optim/lr": self.scheduler.get_last_lr()[0],
        })
        if self.momentum_net is not None:
            metrics["momentum/m"] = momentum_at(self.state["updates"], self.total_updates, a.momentum, a.momentum_schedule)
        if mismatch:
            metrics["rollout/logprob_mismatch"] = sum(mismatch) / len(mismatch)
        if diagnose:
            # Section 1: change in the negatives' per-token mean log pi over this batch's updates.
            metrics["implicit_neg/delta_logp"] = self._mean_logprob(negative, rollouts) - before
        return metrics

    def _accumulate_gradients(self, rollouts, rewards, group_t, mb_rows, norms, n_pos, old, ref, mismatch):
        """Forward and backward over micro-batches of whole groups; gradients add up to the step's."""
        obj, stats, finite = self.objective, [], True
        for micro in pack_groups(mb_rows, rollouts.group_ids, self.cfg.trainer.micro_batch_size):
            seqs, lp, h = self._forward(self.model, rollouts, micro, hidden=obj.penalty_input == "hidden", grad=True)
            mask = seqs.mask
            if old:
                old_lp = _stack(old, micro, mask)
            else:  # one update per batch: this forward is at pi_old (rho = 1 exactly)
                old_lp = lp.detach()
                if rollouts.logprobs is not None:
                    mismatch.append(_mismatch(old_lp, rollouts, micro, mask))
            kwargs = {"ref_logprobs": _stack(ref, micro, mask)} if ref else {}
            loss, m = obj.policy_loss(lp, old_lp, mask, rewards[micro], group_t[micro], **norms, **kwargs)
            m.pop("positives", None)
            m["loss/policy"] = float(loss.detach())
            pos = rewards[micro] > 0.5
            if obj.penalty is not None and bool(pos.any()):
                penalty, pm = self._penalty(rollouts, micro, seqs, lp, h, pos, n_pos)
                loss = loss + obj.penalty_weight * penalty
                m.update(pm)
            finite &= bool(torch.isfinite(loss.detach()))
            if loss.requires_grad:
                loss.backward()
            stats.append((int(mask.sum()), m))
        return stats, finite

    def _penalty(self, rollouts, micro, seqs, lp, h, pos, n_positives):
        obj = self.objective
        want_hidden = obj.penalty_input == "hidden"
        if bool(pos.all()):  # POPO forwards positives only: reuse the batch
            with torch.no_grad():
                mom_lp, mom_h = completion_forward(self.momentum_net, seqs, temperature=self.cfg.rollout.temperature,
                                                   suppress_ids=self.suppress, logprobs=not want_hidden, hidden=want_hidden)
        else:
            pos_rows = [row for row, p in zip(micro, pos.tolist()) if p]
            _, mom_lp, mom_h = self._forward(self.momentum_net, rollouts, pos_rows, hidden=want_hidden,
                                             logprobs=not want_hidden)
        width = (mom_h if want_hidden else mom_lp).shape[1]
        mask = seqs.mask[pos][:, :width]
        if obj.penalty_input == "hidden":
            return obj.penalty(h[pos][:, :width], mom_h, mask, predictor=self.predictor, n_positives=n_positives)
        return obj.penalty(lp[pos][:, :width], mom_lp, mask, n_positives=n_positives)

    def _optimizer_step(self, ok: bool, stats: list) -> bool:
        """Clip, step and update the momentum network; skip (and count) a non-finite step."""
        a, o = self.cfg.algo, self.cfg.optim
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)) if ok else float("nan")
        stepped = ok and math.isfinite(grad_norm)
        if stepped:
            self.optimizer.step()
            self.scheduler.step()
            self.state["nonfinite"] = 0
            for _, m in stats:
                m["grad/norm"] = grad_norm
        else:
            self.state["skipped"] += 1
            if stats:  # had positives (or completions) but the loss or gradient was not finite
                self.state["nonfinite"] += 1
                if self.state["nonfinite"] >= self.cfg.trainer.max_nonfinite:
                    raise TrainingAborted(
                        f"{self.state['nonfinite']} non-finite losses in a row (trainer.max_nonfinite); "
                        "lower optim.lr or check the model's dtype"
                    )
        self.optimizer.zero_grad(set_to_none=True)
        self.state["updates"] += 1
        if self.momentum_net is not None:
            m = momentum_at(self.state["updates"], self.total_updates, a.momentum, a.momentum_schedule)
            # Section 2: xi <- m * xi + (1 - m) * theta after every optimizer step.
            momentum_update_(self.momentum_net.parameters(), self.model.parameters(), m)
        return stepped


def _stack(by_row: dict[int, torch.Tensor], rows: list[int], mask: torch.Tensor) -> torch.Tensor:
    """Per-row token tensors as one [len(rows), T] tensor shaped like `mask`, zero-padded."""
    out = torch.nn.utils.rnn.pad_sequence([by_row[r] for r in rows], batch_first=True)
    return torch.nn.functional.pad(out, (0, mask.shape[1] - out.shape[1])).float()


def _mismatch(recomputed: torch.Tensor, rollouts: Rollouts, rows: list[int], mask) -> float:
    """Mean |sampler log-prob - trainer log-prob| over tokens (METHOD.md, Setting)."""
    width = recomputed.shape[1]
    sampler = [row[:width] + [0.0] * (width - len(row)) for row in (rollouts.logprobs[r] for r in rows)]
    valid = [[1.0] * min(len(rollouts.logprobs[r]), width) + [0.0] * (width - len(rollouts.logprobs[r])) for r in rows]
    sampler_t = torch.tensor(sampler, device=recomputed.device)
    valid_t = torch.tensor(valid, device=recomputed.device)
    return float(((recomputed.float() - sampler_t).abs() * valid_t).sum() / valid_t.sum().clamp_min(1.0))


def train(cfg: Config, callbacks: Callbacks | None = None) -> TrainResult:
    return Trainer(cfg, callbacks).run()
