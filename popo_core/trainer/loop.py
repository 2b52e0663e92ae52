"""One training run: rollout -> reward -> update -> log -> checkpoint (`train`, on one screen).

The update (popo_core/trainer/update.py) is the method; the run's life (popo_core/trainer/lifecycle.py) is the output
directory, resume, MLflow and the result files; this module builds the networks and holds the loop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import random
import time
import zlib

import torch

from popo_core.trainer import distributed
from popo_core.config import Config, ConfigError
from popo_core.data.datasets import Problem, prompt_ids
from popo_core.evaluation.metrics import evaluate_problems
from popo_core.model.loading import load_model_and_tokenizer, resolve_device, resolve_dtype
from popo_core.model.lora import add_lora
from popo_core.trainer.companions import momentum_network, reference_network
from popo_core.algo.objective import build_objective
from popo_core.trainer.packing import packing_for
from popo_core.grading.verifiers import grade_counts
from popo_core.rollout import Rollouts, make_engine
from popo_core.rollout.colocate import check_groups
from popo_core.rollout.sampling import prompt_keys
from popo_core.rollout.source import Request, rollout_source
from popo_core.rollout.sharded import ShardedEngine
from popo_core.trainer.lifecycle import Callbacks, TrainingRun, TrainResult
from popo_core.algo.siamese import Predictor
from popo_core.data.tasks import eval_normalizer, load_task, make_verifier
from popo_core.trainer.update import Batch, Learner, update


def train(cfg: Config, callbacks: Callbacks | None = None, run: TrainingRun | None = None) -> TrainResult:
    """Train `cfg` to trainer.max_steps, resuming its output directory's checkpoint if it has one."""
    run = run or TrainingRun(cfg, callbacks)
    if (done := run.finished_result()) is not None:
        return done
    r = cfg.rollout
    learner, tokenizer, engine = build(cfg)
    train_set, eval_set = load_task(cfg)
    verifier = make_verifier(cfg.data.task)
    metrics: dict[str, float] = {}
    requests = functools.partial(step_request, cfg, tokenizer, train_set)
    with run.open(learner, tokenizer), contextlib.closing(rollout_source(cfg, engine, learner, tokenizer, requests)) as source:
        source.start(run.state["step"], learner.model, run.held)  # a resumed run's weights (and in-flight batches)
        if run.state["step"] == 0 and eval_set:
            run.log(0, evaluate(engine, tokenizer, eval_set, verifier, cfg, learner))
        for step in run.steps():
            start = time.perf_counter()
            problems = prompt_batch(train_set, step, r.prompts_per_step, cfg.trainer.seed)
            rollouts = source.next(step)  # sampled from the weights after step max(0, step - 1 - max_staleness)
            generated = time.perf_counter()
            grades = verifier(rollouts.texts, [problems[g].answer for g in rollouts.group_ids])
            rewards = torch.tensor([float(g.correct) for g in grades], device=learner.device)
            graded = time.perf_counter()
            metrics = update(learner, Batch.of(rollouts, rewards), cfg, step)
            source.push(step, learner.model)
            end = time.perf_counter()
            metrics |= rollout_metrics(rollouts, rewards, grades, r.group_size, step,
                                       {"grade_s": graded - generated, "update_s": end - graded, "step_s": end - start})
            if eval_set and run.eval_due(step):
                metrics |= evaluate(engine, tokenizer, eval_set, verifier, cfg, learner)
            run.log(step, metrics)
            if run.save_due(step):
                run.save(source.held())
        result = run.finish(metrics)
    if isinstance(engine, ShardedEngine):
        engine.close()  # vLLM's, now, while the trainer's process group is still there (colocate.shutdown)
    return result


# ---------------------------------------------------------------------------------- set-up
def build(cfg: Config):
    """(learner, tokenizer, engine): the policy, its optimizer, the networks its method needs.

    Trainable weights, optimizer states and the momentum network are fp32 (master weights) and
    forward/backward run in `model.dtype` under autocast; with LoRA the frozen base stays in
    `model.dtype` and only the fp32 adapter trains."""
    from popo_core.model import warmstart

    t, a, o = cfg.trainer, cfg.algo, cfg.optim
    objective = build_objective(a, group_size=cfg.rollout.group_size)  # a bad combination fails before any loading
    m = warmstart.ensure(cfg).model  # model.name_or_path=warmstart: built once, then read from its cache
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    ranks, device_name = distributed.from_env(t.device)  # torchrun: this rank's place and device
    device = resolve_device(device_name)
    compute_dtype = resolve_dtype(m.dtype, device)
    lora = m.lora.rank > 0
    if lora and ranks.distributed:
        raise ConfigError("model.lora.rank > 0 with several processes: LoRA under FSDP is not supported yet "
                          "(a LoRA run fits one GPU: see popo train PRESET --dry-run)")
    model, tokenizer = load_model_and_tokenizer(m, device=device, seed=t.seed,
                                                dtype=compute_dtype if lora else torch.float32)
    if lora:
        model = add_lora(model, m.lora)
    model.train()
    # Several ranks, hf: each samples its share with a whole copy, fed the full weights at each
    # push. vllm: one engine per rank (or per group of rollout.tensor_parallel_size ranks), started
    # here from the still whole model, then fed from the shards; no copy is kept (rollout/colocate.py).
    colocated = ranks.distributed and cfg.rollout.engine == "vllm"
    if colocated:
        check_groups(ranks.world, cfg.rollout.tensor_parallel_size)
    whole = copy.deepcopy(model).eval() if ranks.distributed and not colocated else None
    engine = make_engine(cfg.rollout.engine, whole if whole is not None else model, tokenizer, seed=t.seed,
                         trust_remote_code=m.trust_remote_code, rollout=cfg.rollout, dtype=compute_dtype,
                         colocated=colocated)
    if ranks.distributed:
        engine = ShardedEngine(engine, ranks, cfg.rollout.tensor_parallel_size if colocated else 1)
    predictor = None
    if a.predictor and objective.penalty is not None and objective.penalty.reads == "hidden":
        predictor = Predictor(model.config.hidden_size).to(device)
    momentum = momentum_network(model) if objective.siamese else None
    reference = reference_network(model, compute_dtype) if objective.needs.reference else None
    if ranks.distributed:  # the companions are sharded like the policy and updated shard by shard
        for companion in (momentum, reference):
            if companion is not None:
                distributed.shard(companion.module, compute_dtype)
        distributed.shard(model, compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad] + (list(predictor.parameters()) if predictor else [])
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    warm = max(o.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    learner = Learner(
        model=model, optimizer=optimizer, scheduler=scheduler, params=params, objective=objective,
        pad_id=engine.pad_id, suppress=list(engine.suppress), temperature=cfg.rollout.temperature,
        total_updates=t.max_steps * a.epochs * a.mini_batches, compute_dtype=compute_dtype,
        momentum=momentum, reference=reference, predictor=predictor, ranks=ranks, whole=whole,
        packing=packing_for(t.packing, getattr(model.config, "_attn_implementation", None), t.max_tokens_per_row),
        max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
    )
    return learner, tokenizer, engine


def step_request(cfg: Config, tokenizer, problems: list[Problem], step: int) -> Request:
    """The prompts of `step`'s batch and their sampling keys."""
    r, seed = cfg.rollout, cfg.trainer.seed
    batch = prompt_batch(problems, step, r.prompts_per_step, seed)
    return Request(prompt_ids(tokenizer, cfg.model.template, batch), prompt_keys(seed, step, 0, len(batch)))


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


# --------------------------------------------------------------------------- around the update
def evaluate(engine, tokenizer, problems: list[Problem], verifier, cfg: Config, learner) -> dict[str, float]:
    """Held-out greedy accuracy (the same pass as `popo eval`, with the task's answer normaliser) and,
    with trainer.eval_samples, the sampled pass@1 at the rollout temperature (`eval/pass_at_1`:
    MLflow names hold no "@"). The samples' keys depend on the seed and prompt, not the step, so
    every evaluation of a run (and a resumed one) draws alike."""
    r, n = cfg.rollout, cfg.trainer.eval_samples
    normalize = eval_normalizer(cfg.data)
    common = dict(template=cfg.model.template, max_new_tokens=r.eval_max_new_tokens or r.max_new_tokens,
                  **({"normalize": normalize} if normalize is not None else {}))
    with learner.autocast():
        out = {"eval/accuracy": evaluate_problems(engine, tokenizer, problems, verifier, greedy=True, batch_prompts=256,
                                                  **common).accuracy}
        if n:  # about 256 completions a batch, as for the greedy pass
            sampled = evaluate_problems(engine, tokenizer, problems, verifier, greedy=False, samples=n,
                                        batch_prompts=max(1, 256 // n),
                                        temperature=r.temperature, top_p=r.top_p,
                                        seeds=prompt_keys(cfg.trainer.seed, 0, 0, len(problems), stream=1), **common)
            out["eval/pass_at_1"] = sampled.accuracy  # the mean over prompts of c/n: pass@1 unbiased
    return out


def rollout_metrics(rollouts: Rollouts, rewards: torch.Tensor, grades, group_size: int, step: int,
                    times: dict[str, float]) -> dict[str, float]:
    """The batch's numbers and the step's times: generate_s is the sampler's, wait_s the trainer's
    wait for the batch (the same in the synchronous loop), step_s the step's wall time from asking for
    the batch to the pushed weights (between two steps, logging, evaluations and checkpoints only)."""
    groups = torch.tensor(rollouts.group_ids)
    per_group = torch.zeros(int(groups.max()) + 1).index_add(0, groups, rewards.cpu())
    n_tokens = sum(len(c) for c in rollouts.completion_ids)
    counts = grade_counts(grades)
    meta = rollouts.meta
    return {
        "reward/mean": float(rewards.mean()),
        "positives/fraction": float((rewards > 0.5).float().mean()),
        "groups/no_positive_fraction": float((per_group == 0).float().mean()),
        "groups/all_positive_fraction": float((per_group == group_size).float().mean()),
        "completion/length": n_tokens / len(rollouts),
        "completion/truncated_fraction": sum(rollouts.truncated) / len(rollouts),
        # The step's completions (tokens, in batch order) in one number: equal runs sampled the same.
        "completion/crc32": float(zlib.crc32(json.dumps(rollouts.completion_ids).encode())),
        "rollout/staleness": float(step - 1 - meta["policy_version"]),  # updates between sampler and learner
        "grading/timeouts": counts["timeout"],
        "grading/errors": counts["error"],
        "throughput/tokens_per_s": n_tokens / times["step_s"],
        "time/generate_s": meta["generate_s"],
        "time/wait_s": meta["wait_s"],
        **{f"time/{k}": v for k, v in times.items()},
    }
