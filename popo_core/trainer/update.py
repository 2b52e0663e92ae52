"""The update: one rollout batch -> `algo.epochs` passes of `algo.mini_batches` optimizer steps.

Each optimizer step reads forward/backward -> clip -> step -> momentum update (METHOD.md sections
1-2). A micro-batch is any slice of the completions the method forwards, of at most
`trainer.micro_batch_size` completions or `trainer.max_tokens_per_micro_batch` tokens; a group may
span several: the step's quantities (advantages, weights, normalisers) are computed once over the
whole step, so the gradient does not depend on the split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from popo_core.algo.losses import rollout_divergence, rollout_weights
from popo_core.trainer.distributed import SINGLE, Ranks, full, full_state_dict, reshard, whole_on_main
from popo_core.trainer.companions import autocast
from popo_core.algo.objective import Objective
from popo_core.trainer.logprobs import collate, completion_forward, completion_logprobs_and_entropy
from popo_core.trainer.packing import MICRO_BATCH_SIZE, PADDED, Packing, rank_token_chunks
from popo_core.rollout import Rollouts
from popo_core.algo.siamese import momentum_at


class TrainingAborted(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class Counters:
    updates: int = 0  # optimizer steps taken or skipped (the K of the momentum schedule)
    skipped: int = 0  # skipped: no completion to learn from, or a non-finite loss or gradient
    nonfinite: int = 0  # non-finite losses in a row


@dataclass
class Learner:
    """What the update reads and advances: the networks, the optimizer and the method."""

    model: Any
    optimizer: Any
    scheduler: Any
    params: list
    objective: Objective
    pad_id: int
    suppress: list[int]
    temperature: float  # the sampler's: log-probs are of logits / temperature (METHOD.md, Setting)
    total_updates: int
    compute_dtype: torch.dtype = torch.float32  # forward/backward under autocast; masters stay fp32
    momentum: Any = None  # the siamese momentum network xi (METHOD.md section 2): popo_core.trainer.companions
    reference: Any = None  # frozen initial policy (GRPO's KL term): popo_core.trainer.companions
    predictor: Any = None  # BYOL predictor (METHOD.md section 3)
    counters: Counters = field(default_factory=Counters)
    ranks: Ranks = SINGLE  # several processes: each forwards its share of every step (distributed.py)
    whole: Any = None  # under FSDP: an unsharded copy of the policy (the sampler's, and what is saved)
    packing: Packing = PADDED  # how every forward lays out its sequences (popo_core/trainer/packing.py)
    max_tokens_per_micro_batch: int | None = None  # micro-batches by tokens instead of by completions
    padded_tokens: float = 0.0  # this update's so far: positions its gradient forwards ran on no token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        return autocast(self.device, self.compute_dtype)

    def export(self):
        """The policy as one whole module (under FSDP, a collective: the HF sampler's copy given the
        current weights, or with vLLM a module on rank 0 only, None elsewhere)."""
        if not self.ranks.distributed:
            return self.model
        if self.whole is None:
            return whole_on_main(self.model, self.ranks)
        self.whole.load_state_dict(full_state_dict(self.model))
        return self.whole


@dataclass
class Batch:
    """A graded rollout batch as tensors; rows are completions, prompt-major."""

    rollouts: Rollouts
    rewards: Tensor  # [N] in {0, 1}
    group_ids: Tensor  # [N]
    lengths: Tensor  # [N] completion tokens, EOS included
    sampler_logprobs: Tensor | None  # [N, W] the sampler's own log-probs (mu), zero-padded

    @classmethod
    def of(cls, rollouts: Rollouts, rewards: Tensor) -> "Batch":
        device = rewards.device
        lengths = torch.tensor([len(c) for c in rollouts.completion_ids], device=device)
        mu = None
        if rollouts.logprobs is not None:
            width = max(int(lengths.max()), 1)
            mu = torch.tensor([row + [0.0] * (width - len(row)) for row in rollouts.logprobs], device=device)
        return cls(rollouts, rewards, torch.tensor(rollouts.group_ids, device=device), lengths, mu)

    def __len__(self) -> int:
        return len(self.rollouts)


# ------------------------------------------------------------------------ the micro-batch driver
@dataclass(frozen=True)
class MicroBatch:
    """A slice of an optimizer step's forwarded completions, as the driver hands it to the method."""

    positions: Tensor  # indices into the step's forwarded rows
    weight: float  # the gradient's scale; 0: a placeholder, run only to keep the ranks in step
    lockstep: bool  # every forward must run on every rank (FSDP's collectives), wanted or not


def micro_batches(ranks: Ranks, positions: Tensor, size: int | None, costs: list[int] | None = None,
                  max_tokens: int | None = None, padded: bool = True):
    """This rank's micro-batches of `positions`: of at most `size` rows (None: 256), or, given
    `max_tokens`, of at most that many tokens (`costs`: each position's sequence tokens; summed when
    packed, the longest times the rows when `padded`), the rows shared among the ranks by tokens.
    Every rank runs as many micro-batches as the busiest one, so the collectives stay in step: a rank
    whose share ran out runs a placeholder (one row, weight 0). Otherwise the weight is the world
    size: FSDP averages gradients over ranks, so scaled by their number they sum (x 1 on one process)."""
    if max_tokens is None:
        chunks = ranks.chunks(positions, size or MICRO_BATCH_SIZE)
    else:
        runs = rank_token_chunks(costs, max_tokens, padded, ranks.rank, ranks.world)
        chunks = [positions[torch.tensor(run, dtype=torch.long, device=positions.device)] for run in runs]
    for pos in chunks:
        if len(pos) == 0:
            yield MicroBatch(positions[:1], 0.0, ranks.distributed)
        else:
            yield MicroBatch(pos, float(ranks.world), ranks.distributed)


# ---------------------------------------------------------------------------------- forwards
def _collate(learner: Learner, batch: Batch, rows: list[int]):
    """The seam every forward of the update goes through: rows -> the learner's layout."""
    r = batch.rollouts
    return collate([r.prompt_ids[i] for i in rows], [r.completion_ids[i] for i in rows], learner.pad_id, learner.device,
                   learner.packing)


def _micro_batches(learner: Learner, batch: Batch, positions: Tensor, rows: list[int], size: int | None):
    """micro_batches of `positions` (indices into `rows`, batch rows) under the learner's budget."""
    budget = learner.max_tokens_per_micro_batch
    costs = None
    if budget is not None:
        r = batch.rollouts
        costs = [len(r.prompt_ids[rows[i]]) + len(r.completion_ids[rows[i]]) - 1 for i in positions.tolist()]
    return micro_batches(learner.ranks, positions, size, costs, budget, padded=learner.packing.mode == "padded")


def _padded(t: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, max(width - t.shape[1], 0)))[:, :width]


def recompute(learner: Learner, model, batch: Batch, rows: list[int], micro_batch_size: int | None,
              entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) of `rows` under `model`, no gradient, as [N, W] tensors
    over the whole batch (zero where not computed). Each rank computes its share; the shares are
    summed, so every rank holds the whole result."""
    width = max(int(batch.lengths.max()), 1)
    dtype = torch.promote_types(next(learner.model.parameters()).dtype, torch.float32)
    lp = torch.zeros(len(batch), width, device=learner.device, dtype=dtype)
    ent = torch.zeros_like(lp) if entropy else None
    for mb in _micro_batches(learner, batch, torch.tensor(rows, dtype=torch.long), list(range(len(batch))),
                             micro_batch_size):
        micro = mb.positions.tolist()
        seqs = _collate(learner, batch, micro)
        with learner.autocast():
            m_lp, m_ent = completion_logprobs_and_entropy(model, seqs, temperature=learner.temperature,
                                                          suppress_ids=learner.suppress)
        if mb.weight == 0:  # a placeholder: its forward only kept the collectives in step
            continue
        index = torch.tensor(micro, device=learner.device)
        lp[index] = _padded(m_lp.to(dtype), width)
        if ent is not None:
            ent[index] = _padded(m_ent.to(dtype), width)
    reshard(model)  # FSDP: back to shards (nothing on one process)
    learner.ranks.sum_(lp)  # each rank computed its share
    if ent is not None:
        learner.ranks.sum_(ent)
    return lp, ent


# -------------------------------------------------------------------------- one optimizer step
@dataclass
class StepInputs:
    """One optimizer step's completions and what was computed for them before the step."""

    rows: Tensor  # batch rows of the step (whole groups)
    old: Tensor | None  # [N, W] pi_old log-probs; None: the step's own forward is at pi_old
    ref: Tensor | None  # [N, W] reference log-probs


def backward(learner: Learner, batch: Batch, inputs: StepInputs, *, micro_batch_size: int | None, correction: str = "none",
             cap: float = 2.0) -> dict[str, float]:
    """Forward and backward of one optimizer step over its forwarded completions, in micro-batches;
    the gradients add up to the whole step's (over every rank). Returns the step's sums over this
    rank's micro-batches (see reduce_sums)."""
    obj, rows = learner.objective, inputs.rows
    rewards, gids, lengths = batch.rewards[rows], batch.group_ids[rows], batch.lengths[rows]
    seq_log_ratio = None
    if obj.needs.seq_log_ratio and inputs.old is not None:
        seq_log_ratio = _seq_log_ratio(learner, batch, rows, inputs.old, micro_batch_size)
    # METHOD.md section 1: the normalisers are those of the whole optimizer step.
    step = obj.quantities(rewards, gids, lengths, seq_log_ratio=seq_log_ratio)
    forwarded = obj.forwarded(rewards)
    penalised = forwarded & obj.penalised(rewards)
    n_penalised = int(penalised.sum())
    positions = forwarded.nonzero().squeeze(-1)
    penalty = obj.penalty_fn()
    reads_hidden = penalty is not None and obj.penalty.reads == "hidden"
    # Sums over micro-batches: the losses (each already over the step's denominators) and the
    # token-weighted loss metrics; the sampler divergence when this forward is pi_old's.
    sums = {"loss/policy": 0.0, "tokens": 0.0, "penalty": 0.0, "mismatch": 0.0, "kl": 0.0, "sampled_tokens": 0.0,
            "nonfinite": 0.0, "padded_tokens": 0.0}
    for mb in _micro_batches(learner, batch, positions, rows.tolist(), micro_batch_size):
        micro = rows[mb.positions].tolist()
        pen_rows = penalised[mb.positions]
        live = bool(pen_rows.any()) and mb.weight > 0  # penalised rows here count; else a zero-weight
        # momentum forward still runs in lockstep, where every rank joins the momentum network's collectives
        with_penalty = penalty is not None and (bool(pen_rows.any()) or mb.lockstep)
        out = micro_batch_loss(
            learner, batch, inputs, step.take(mb.positions), micro, correction=correction, cap=cap,
            penalty=penalty if with_penalty else None, pen_rows=pen_rows if live else torch.ones_like(pen_rows),
            n_penalised=max(n_penalised, 1), penalty_weight=obj.penalty_weight if live else 0.0,
            reads_hidden=reads_hidden)
        if mb.weight > 0:
            n_tok = float(out.mask.sum())
            sums["loss/policy"] += float(out.policy.detach())
            sums["penalty"] += out.penalty if live else 0.0
            sums["tokens"] += n_tok
            sums["padded_tokens"] += out.padded_tokens
            for key, value in out.metrics.items():  # clip/fraction, ratio/mean, ...: token means, weighted
                sums[TOKEN_MEAN + key] = sums.get(TOKEN_MEAN + key, 0.0) + value * n_tok
            if inputs.old is None and out.sampler is not None:
                for k, v in rollout_divergence(out.old, out.sampler, out.mask).items():
                    sums[k] += v
            sums["nonfinite"] += float(not bool(torch.isfinite(out.total.detach())))
        if out.total.requires_grad:
            (out.total * mb.weight).backward()
    return sums


@dataclass
class MicroLoss:
    """One micro-batch's loss and what the step's metrics need from it."""

    total: Tensor  # policy loss + penalty_weight * penalty: what is backpropagated
    policy: Tensor  # the method's policy loss alone
    penalty: float  # the penalty's value (0.0 without one)
    metrics: dict[str, float]  # the loss's own metrics (clip/fraction, ratio/mean, ...), token means
    mask: Tensor  # [n, W] completion tokens
    old: Tensor  # [n, W] pi_old log-probs
    sampler: Tensor | None  # [n, W] the sampler's own log-probs (mu), when it reported them
    padded_tokens: int = 0  # positions the policy's forward ran that held no token


def micro_batch_loss(learner: Learner, batch: Batch, inputs: StepInputs, quantities, micro: list[int], *,
                     correction: str, cap: float, penalty, pen_rows: Tensor, n_penalised: int, penalty_weight: float,
                     reads_hidden: bool) -> MicroLoss:
    """One micro-batch's loss: the method's policy loss with the step's quantities, plus the weighted
    siamese penalty over its penalised rows (METHOD.md sections 1 and 3)."""
    obj = learner.objective
    seqs = _collate(learner, batch, micro)
    with learner.autocast():
        lp, h = completion_forward(learner.model, seqs, temperature=learner.temperature,
                                   suppress_ids=learner.suppress, hidden=reads_hidden)
    mask, width = seqs.mask, seqs.mask.shape[1]
    # pi_old (METHOD.md, Setting): recomputed before the step, or, with one optimizer step per
    # rollout batch, this very forward (rho = 1 exactly).
    old = inputs.old[micro, :width] if inputs.old is not None else lp.detach()
    mu = batch.sampler_logprobs[micro, :width] if batch.sampler_logprobs is not None else None
    token_weight = rollout_weights(old, mu, mask, mode=correction, cap=cap)
    extra = {"ref_logprobs": inputs.ref[micro, :width]} if obj.needs.reference else {}
    loss, m = obj.policy_loss(lp, old, mask, batch.rewards[micro], batch.group_ids[micro], step=quantities,
                              token_weight=token_weight, **extra)
    total, p_value = loss, 0.0
    if penalty is not None:
        # METHOD.md section 3: the penalty over the method's penalised completions, mean over the step's.
        with learner.autocast():
            p_loss, _ = _penalty(learner, batch, micro, seqs, lp, h, pen_rows, n_penalised, penalty)
        total = total + penalty_weight * p_loss
        p_value = float(p_loss.detach())
    return MicroLoss(total, loss, p_value, m, mask, old, mu, seqs.padded_tokens)


TOKEN_MEAN = "token_mean:"  # a loss metric's token-weighted sum over the step's micro-batches


def reduce_sums(sums: dict[str, float], penalty_key: str | None) -> dict[str, float]:
    """The optimizer step's metrics from its sums (over every rank): the losses as summed (each
    micro-batch's term is already over the step's denominators), every metric the loss returned as
    its token mean, the sampler divergence per sampled token."""
    tokens = max(sums["tokens"], 1.0)
    out = {"loss/policy": sums["loss/policy"]}
    out |= {k[len(TOKEN_MEAN):]: v / tokens for k, v in sums.items() if k.startswith(TOKEN_MEAN)}
    if penalty_key is not None:
        out[penalty_key] = sums["penalty"]  # each micro-batch's term is over the step's count: their sum is the mean
    if sums["sampled_tokens"] > 0:
        out["rollout/logprob_mismatch"] = sums["mismatch"] / sums["sampled_tokens"]
        out["rollout/kl"] = sums["kl"] / sums["sampled_tokens"]
    return out


def _sum_over_ranks(ranks: Ranks, sums: dict[str, float]) -> dict[str, float]:
    if not ranks.distributed:
        return sums
    keys = sorted(set().union(*ranks.gather(sorted(sums))))
    values = ranks.sum_(torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64))
    return dict(zip(keys, values.tolist()))


def _seq_log_ratio(learner: Learner, batch: Batch, rows: Tensor, old: Tensor, micro_batch_size: int | None) -> Tensor:
    """mean_t log rho_it of every row of the step at the current policy (no gradient), for
    self-normalised weights; zero for rows the method does not forward."""
    forwarded = learner.objective.forwarded(batch.rewards[rows])
    fwd_rows = rows[forwarded].tolist()
    current, _ = recompute(learner, learner.model, batch, fwd_rows, micro_batch_size)
    mask = torch.arange(old.shape[1], device=old.device)[None, :] < batch.lengths[rows][:, None]
    diff = torch.where(mask, current[rows] - old[rows], torch.zeros_like(old[rows]))
    out = diff.sum(-1) / mask.sum(-1).clamp_min(1)
    return torch.where(forwarded, out, torch.zeros_like(out))


def _penalty(learner: Learner, batch: Batch, micro: list[int], seqs, lp, h, pen_rows: Tensor, n_rows: int, penalty):
    obj = learner.objective
    reads_hidden = obj.penalty.reads == "hidden"
    with torch.no_grad():
        if bool(pen_rows.all()):  # the micro-batch is the penalised rows: reuse it
            mom_seqs = seqs
        else:
            mom_seqs = _collate(learner, batch, [r for r, p in zip(micro, pen_rows.tolist()) if p])
        with learner.momentum.active() as momentum:  # with LoRA: the momentum adapter, then the policy's again
            mom_lp, mom_h = completion_forward(momentum, mom_seqs, temperature=learner.temperature,
                                               suppress_ids=learner.suppress, logprobs=not reads_hidden,
                                               hidden=reads_hidden)
            reshard(momentum)  # FSDP: back to shards (nothing on one process)
    width = mom_seqs.mask.shape[1]
    mask = seqs.mask[pen_rows][:, :width]
    if reads_hidden:
        return penalty(h[pen_rows][:, :width], mom_h, mask, predictor=learner.predictor, n_rows=n_rows)
    return penalty(lp[pen_rows][:, :width], mom_lp, mask, n_rows=n_rows)


def optimizer_step(learner: Learner, batch: Batch, inputs: StepInputs, cfg) -> dict[str, float] | None:
    """backward -> clip -> AdamW step -> momentum update. Returns the step's metrics, or None when
    the step was skipped (nothing to learn from, or a non-finite loss or gradient)."""
    a, o, t, c = cfg.algo, cfg.optim, cfg.trainer, learner.counters
    sums = backward(learner, batch, inputs, micro_batch_size=t.micro_batch_size, correction=a.rollout_correction,
                    cap=a.rollout_is_cap)
    sums = _sum_over_ranks(learner.ranks, sums)  # every rank decides alike
    learner.padded_tokens += sums["padded_tokens"]
    tokens, finite = sums["tokens"], sums["nonfinite"] == 0
    metrics = reduce_sums(sums, learner.objective.penalty.metric if learner.objective.penalty else None)
    learned = tokens > 0 and finite
    grad_norm = _clip(learner.params, o.max_grad_norm) if learned else float("nan")
    stepped = learned and math.isfinite(grad_norm)
    if stepped:
        learner.optimizer.step()
        learner.scheduler.step()
        c.nonfinite = 0
    else:
        c.skipped += 1
        if tokens > 0:  # something to learn from, but the loss or gradient was not finite
            c.nonfinite += 1
            if c.nonfinite >= t.max_nonfinite:
                raise TrainingAborted(f"{c.nonfinite} non-finite losses in a row (trainer.max_nonfinite); "
                                      "lower optim.lr or check the model's dtype")
    learner.optimizer.zero_grad(set_to_none=True)
    c.updates += 1
    if learner.momentum is not None:
        # METHOD.md section 2: xi <- m * xi + (1 - m) * theta after every optimizer step.
        m = momentum_at(c.updates, learner.total_updates, a.momentum, a.momentum_schedule)
        learner.momentum.update_(learner.model, m)
    return metrics | {"grad/norm": grad_norm} if stepped else None


def _clip(params: list, max_norm: float) -> float:
    return float(full(torch.nn.utils.clip_grad_norm_(params, max_norm)))


# ------------------------------------------------------------------------------- the update
def mini_batch_groups(n_prompts: int, mini_batches: int, generator: torch.Generator) -> list[list[int]]:
    """One pass: a seeded permutation of the prompts cut into `mini_batches` disjoint slices."""
    order = torch.randperm(n_prompts, generator=generator).tolist()
    return [sorted(order[k::mini_batches]) for k in range(mini_batches)]


def update(learner: Learner, batch: Batch, cfg, step: int) -> dict[str, float]:
    """algo.epochs passes of algo.mini_batches optimizer steps over the rollout batch (METHOD.md,
    Setting); returns the step's metrics, averaged over the optimizer steps that were taken."""
    a, t, obj = cfg.algo, cfg.trainer, learner.objective
    every_row = list(range(len(batch)))
    forwarded = obj.forwarded(batch.rewards).nonzero().squeeze(-1).tolist()
    diagnose = bool(t.diagnostics_every) and step % t.diagnostics_every == 0
    several = a.epochs * a.mini_batches > 1
    metrics: dict[str, float] = {}
    before = entropy = old = ref = None
    if several or diagnose:
        # One no-grad pass at pi_old: the old log-probs of several updates, and on diagnostic
        # steps every completion's log-prob and entropy before the updates.
        before, entropy = recompute(learner, learner.model, batch, every_row if diagnose else forwarded,
                                    t.micro_batch_size, entropy=diagnose)
        old = before if several else None
        if several and batch.sampler_logprobs is not None:
            metrics |= _divergence(before, batch, every_row if diagnose else forwarded)
    if learner.reference is not None:
        with learner.reference.active() as reference:
            ref, _ = recompute(learner, reference, batch, forwarded, t.micro_batch_size)

    taken: list[dict[str, float]] = []
    forward_tokens = 0
    learner.padded_tokens = 0.0
    generator = torch.Generator().manual_seed(t.seed * 7919 + step)
    n_prompts = int(batch.group_ids.max()) + 1
    for _ in range(a.epochs):
        for groups in mini_batch_groups(n_prompts, a.mini_batches, generator):
            rows = torch.isin(batch.group_ids, torch.tensor(groups, device=batch.group_ids.device)).nonzero().squeeze(-1)
            forward_tokens += int(batch.lengths[rows][obj.forwarded(batch.rewards[rows])].sum())
            taken_step = optimizer_step(learner, batch, StepInputs(rows, old, ref), cfg)
            if taken_step is not None:
                taken.append(taken_step)
    metrics |= _mean(taken)
    c = learner.counters
    metrics |= {"train/forward_tokens": forward_tokens, "train/padded_tokens": int(learner.padded_tokens),
                "train/skipped_updates": c.skipped, "train/updates": c.updates,
                "optim/lr": learner.scheduler.get_last_lr()[0]}
    if learner.momentum is not None:
        metrics["momentum/m"] = momentum_at(c.updates, learner.total_updates, a.momentum, a.momentum_schedule)
    if diagnose:
        after, _ = recompute(learner, learner.model, batch, every_row, t.micro_batch_size)
        metrics |= diagnostics(before, after, entropy, batch)
    return metrics


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def _divergence(recomputed: Tensor, batch: Batch, rows: list[int]) -> dict[str, float]:
    index = torch.tensor(rows, dtype=torch.long, device=recomputed.device)
    width = batch.sampler_logprobs.shape[1]
    mask = torch.arange(width, device=recomputed.device)[None, :] < batch.lengths[index][:, None]
    sums = rollout_divergence(recomputed[index, :width], batch.sampler_logprobs[index], mask)
    n = sums["sampled_tokens"]
    if not n:
        return {}
    return {"rollout/logprob_mismatch": sums["mismatch"] / n, "rollout/kl": sums["kl"] / n}


def diagnostics(before: Tensor, after: Tensor, entropy: Tensor, batch: Batch) -> dict[str, float]:
    """METHOD.md section 1: the change of the negatives' (implicit_neg/delta_logp) and positives'
    (pos/delta_logp) per-token mean log pi over the step's updates; entropy/mean over every sampled token."""
    width = before.shape[1]
    mask = (torch.arange(width, device=before.device)[None, :] < batch.lengths[:, None]).float()
    per_row = ((after - before) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    positive = batch.rewards > 0.5
    out = {"entropy/mean": float((entropy * mask).sum() / mask.sum().clamp_min(1.0))}
    if bool(positive.any()):
        out["pos/delta_logp"] = float(per_row[positive].mean())
    if bool((~positive).any()):
        out["implicit_neg/delta_logp"] = float(per_row[~positive].mean())
    return out
