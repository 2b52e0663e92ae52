"""The warm start: a starting policy popo builds itself by supervised fine-tuning, cached by hash.

`model.name_or_path=warmstart` means: take the random-init tiny Qwen2 of `model.*`, fine-tune it on
the task's worked examples (`warmstart.*`; examples disjoint from the RL training and held-out
prompts), save it, and start RL from it. Everything that determines the result (the task settings
with `data.seed`, the architecture, the `warmstart.*` settings, CODE_VERSION and the torch and
transformers versions, whose floating-point paths 600 steps of SFT amplify) is hashed; the model
lives in `$POPO_CACHE/warmstart/<hash>` (default `~/.cache/popo/warmstart/<hash>`), written to a
temporary directory and renamed into place, under a file lock, so concurrent runs build it once.
Every `trainer.seed` starts from the same warm start.

The arith preset starts from the one popo ships (`popo:arith-warmstart`, popo_core.model.packaged):
`check_shipped` refuses a config whose settings differ from those it was built with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from popo_core.errors import ConfigError
from popo_core.model.cache import atomic_dir, file_lock

# Bump when the SFT loop, the example format or the model builder changes what a spec produces.
CODE_VERSION = 1
MARKER = "warmstart.json"  # written last: its presence means the directory is complete

# progress(step, total_steps, loss)
Progress = Callable[[int, int, float], None]

# The DataConfig fields that decide a task's prompts (the rest: file paths of the math task).
# (The supervised examples come from their own pool, so the numbers of training and held-out
# prompts do not change them.)
_TASK_FIELDS = {"arith": ("task", "seed", "min_terms", "max_terms", "max_operand")}
_MODEL_FIELDS = ("hidden_size", "num_layers", "num_heads", "tie_embeddings", "dtype", "template")


def spec(cfg) -> dict:
    """What determines the warm start, as plain JSON."""
    d, m = cfg.data, cfg.model
    return {
        "code_version": CODE_VERSION,
        "data": {k: getattr(d, k) for k in _TASK_FIELDS[d.task]},
        "model": {k: getattr(m, k) for k in _MODEL_FIELDS},
        "warmstart": dataclasses.asdict(cfg.warmstart),
    }


def build_versions() -> dict:
    """The libraries whose numerics the weights depend on (part of the cache key, not of the spec)."""
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers")}


def spec_hash(cfg) -> str:
    text = json.dumps({**spec(cfg), "build": build_versions()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_shipped(cfg, path: Path, name: str) -> None:
    """A ConfigError naming the first setting in which `cfg` differs from what the shipped warm start
    at `path` was built with (its supervised examples are disjoint from these prompts only then)."""
    built = (read_info(path) or {}).get("spec", {})
    if cfg.data.task not in _TASK_FIELDS or not built:
        raise ConfigError(f"model.name_or_path={name} is the warm start of data.task="
                          f"{built.get('data', {}).get('task', 'arith')}; this config has data.task={cfg.data.task}")
    mine = spec(cfg)
    for section in ("data", "model", "warmstart"):
        for key, value in built[section].items():
            if mine[section].get(key) != value:
                raise ConfigError(f"model.name_or_path={name} was built with {section}.{key}={value}, not "
                                  f"{mine[section].get(key)}: set model.name_or_path=warmstart to build (and cache) "
                                  "a warm start for these settings")


def cache_root() -> Path:
    """$POPO_CACHE/warmstart, else ~/.cache/popo/warmstart."""
    base = os.environ.get("POPO_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "popo") / "warmstart"


def path_for(cfg) -> Path:
    return cache_root() / spec_hash(cfg)


def is_built(path: Path) -> bool:
    return (path / MARKER).is_file()


def ensure(cfg, progress: Progress | None = None, on_build: Callable[[Path], None] | None = None):
    """`cfg` with model.name_or_path pointing at its built warm start (built now if not cached).

    A config whose model is not `warmstart` comes back unchanged. `on_build(path)` is called before
    a build starts (not when the cache has it)."""
    if cfg.model.name_or_path != "warmstart":
        return cfg
    path = path_for(cfg)
    if not is_built(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_suffix(".lock")):
            if not is_built(path):  # another process may have built it while we waited
                if on_build:
                    on_build(path)
                build(cfg, path, progress)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(path)))


# ----------------------------------------------------------------------------------- building
def build(cfg, path: Path, progress: Progress | None = None) -> dict:
    """Fine-tune the tiny model of cfg.model on the task's worked examples; save it at `path`."""
    import torch
    from omegaconf import OmegaConf

    from popo_core.data.datasets import render
    from popo_core.model.loading import build_tiny_model, build_tiny_tokenizer, resolve_dtype, save_policy
    from popo_core.data.tasks import SFT_EXAMPLES, load_task

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    w, m = cfg.warmstart, cfg.model
    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                             tie_embeddings=m.tie_embeddings, seed=w.seed)
    model = model.to(resolve_dtype(m.dtype, torch.device("cpu")))
    _, held_out = load_task(cfg)
    examples = SFT_EXAMPLES[cfg.data.task](cfg.data, w.seed, w.batch_size)
    rendered = ((render(m.template, prompt), completion) for prompt, completion in examples)
    losses = sft(model, tokenizer, rendered, w, progress)
    accuracy = greedy_accuracy(model, tokenizer, held_out, cfg.data.task, template=m.template,
                               max_new_tokens=m.bench_max_new_tokens)
    info = {
        "spec": spec(cfg),
        "hash": path.name,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_greedy_accuracy": accuracy,
        "build_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_dir(path) as tmp:
        save_policy(model, tokenizer, tmp)
        # popo eval reads the template, length limit and held-out prompts from a config.yaml.
        run_view = {"model": dataclasses.asdict(m) | {"name_or_path": str(path)}, "data": dataclasses.asdict(cfg.data),
                    "warmstart": dataclasses.asdict(w)}
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run_view)))
        (tmp / "losses.json").write_text(json.dumps(losses))
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    return info


def lr_at(step: int, w) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to 0 at `steps` (step counts from 1)."""
    if w.warmup_steps and step <= w.warmup_steps:
        return w.lr * step / w.warmup_steps
    span = max(w.steps - w.warmup_steps, 1)
    return w.lr * 0.5 * (1.0 + math.cos(math.pi * (step - w.warmup_steps) / span))


def sft_batch(tokenizer, pairs: list[tuple[str, str]]):
    """(input_ids, attention_mask, labels): prompt + completion + EOS, right-padded; the loss is on
    the completion and its EOS only (labels -100 on the prompt and padding)."""
    import torch

    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False).input_ids
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [p + c + [eos] for p, c in zip(prompts, completions)]
    labels = [[-100] * len(p) + c + [eos] for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, mask, lab


def sft(model, tokenizer, examples: Iterator[tuple[str, str]], w, progress: Progress | None = None) -> list[float]:
    """Plain supervised fine-tuning: `w.steps` AdamW steps of `w.batch_size` examples, the mean
    cross-entropy over completion tokens. Returns the loss of every step."""
    import torch

    torch.manual_seed(w.seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=w.weight_decay)
    model.train()
    losses = []
    for step in range(1, w.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, w)
        ids, mask, labels = (t.to(device) for t in sft_batch(tokenizer, [next(examples) for _ in range(w.batch_size)]))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            progress(step, w.steps, losses[-1])
    model.eval()
    return losses


def greedy_accuracy(model, tokenizer, problems, task: str, *, template: str, max_new_tokens: int) -> float | None:
    """Greedy accuracy on `problems` (the trainer's held-out metric), for the record."""
    if not problems:
        return None
    from popo_core.evaluation.metrics import evaluate_problems
    from popo_core.data.tasks import make_verifier
    from popo_core.rollout.hf import HFEngine

    report = evaluate_problems(HFEngine(model, tokenizer), tokenizer, problems, make_verifier(task),
                               template=template, max_new_tokens=max_new_tokens, greedy=True, batch_prompts=256)
    return report.accuracy


def read_info(path: str | Path) -> dict | None:
    """The warmstart.json of a built warm start, or None."""
    file = Path(path) / MARKER
    return json.loads(file.read_text()) if file.is_file() else None
