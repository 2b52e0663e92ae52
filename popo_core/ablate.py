"""`popo ablate`: full POPO against variants with one component removed (METHOD.md, "Ablations").

Pure orchestration. The variant table is data (experiments/ablations.yaml); a variant is the preset
plus the user's overrides plus its own overrides, composed by `popo_core.config.compose` like any
`popo train`. Every variant runs on the same seeds 0..S-1, so differences to full POPO are paired
per seed. A run is identified by a hash of its resolved config (tracking.* and
trainer.output_dir excluded), stored as an MLflow tag: a rerun reuses the finished runs it finds
and trains only the missing ones, each in a deterministic output dir, so a run killed mid-way
resumes from its checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from popo_core.config import Config, compose, config_dir, methods, to_flat_dict
from popo_core.errors import UserError

FULL = "popo"  # the reference variant: full POPO with the preset's (and the user's) settings
ALL = "all"
# Set per run by the ablation itself; a user override of them would break the pairing or resume.
RESERVED = {
    "trainer.seed": "seeds are 0..S-1 for every variant: use --seeds",
    "trainer.output_dir": "each run gets <output-dir>/<preset>/<variant>-seed<s>-<hash>: use --output-dir",
    "tracking.parent_run_id": "all runs nest under the ablation's own parent run",
    "tracking.run_name": "runs are named <variant>-seed<s>",
    "algo": "the reference is always POPO: use --baseline NAME to add another method",
    "algo.name": "the reference is always POPO: use --baseline NAME to add another method",
}


class AblationError(UserError, ValueError):
    """Bad `popo ablate` input: unknown component, no seeds, reserved or no-op overrides."""


# ------------------------------------------------------------------------------ the variants
@dataclass(frozen=True)
class Variant:
    name: str  # "popo", "drop-<component>" or the baseline's name
    label: str  # as printed: "popo (full)", "drop siamese", "grpo (baseline)"
    changes: str
    overrides: tuple[str, ...] = ()


def variant_table(path: str | Path | None = None) -> dict[str, Variant]:
    """The components of experiments/ablations.yaml, in file order."""
    import yaml

    raw = yaml.safe_load(Path(path or config_dir() / "ablations.yaml").read_text())
    return {
        name: Variant(f"drop-{name}", f"drop {name}", spec["changes"], tuple(spec["overrides"]))
        for name, spec in raw["components"].items()
    }


def baseline_variant(name: str) -> Variant:
    """Any registered method (`algo=<name>`) under the same budget: the preset's rollout,
    optimizer and trainer settings and the user's overrides."""
    from popo_core.algo.losses import METHODS

    choices = [m for m in methods() if m != FULL]
    if name not in choices:
        raise AblationError(f"--baseline {name}: unknown baseline (choose from: {', '.join(choices)})")
    return Variant(name, f"{name} (baseline)", METHODS[name].summary, (f"algo={name}",))


def select_variants(drops: Sequence[str], baselines: Sequence[str] | str | None = ()) -> list[Variant]:
    """Full POPO first, then the dropped components in table order (`all`: every one), then the
    baselines in the order given."""
    components = variant_table()
    baselines = [baselines] if isinstance(baselines, str) else list(baselines or [])
    wanted = set()
    for d in drops:
        name = d.strip().lower()
        if name == ALL:
            wanted |= set(components)
        elif name in components:
            wanted.add(name)
        else:
            raise AblationError(f"--drop {d}: unknown component (choose from: {', '.join(components)}, all)")
    chosen_baselines = [baseline_variant(b) for b in dict.fromkeys(baselines)]
    if not wanted and not chosen_baselines:
        raise AblationError("nothing to compare: give --drop COMPONENT (or --drop all) and/or --baseline NAME")
    full = Variant(FULL, "popo (full)", "full POPO")
    return [full] + [v for name, v in components.items() if name in wanted] + chosen_baselines


# ------------------------------------------------------------------------------------ the plan
def config_hash(cfg: Config) -> str:
    """What makes two runs the same experiment: the resolved config minus where it is logged/written."""
    flat = {k: v for k, v in to_flat_dict(cfg).items() if not k.startswith("tracking.") and k != "trainer.output_dir"}
    # repr keeps inf/nan and distinguishes 1 from 1.0 from "1"; keys sorted for stability.
    text = json.dumps({k: repr(v) for k, v in sorted(flat.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class PlannedRun:
    variant: Variant
    seed: int
    cfg: Config
    config_hash: str

    @property
    def name(self) -> str:
        return f"{self.variant.name}-seed{self.seed}"


@dataclass
class Ablation:
    preset: str
    overrides: list[str]
    seeds: int
    variants: list[Variant]
    runs: list[PlannedRun]
    key: str  # identifies "the same command": the set of resolved configs
    output_dir: Path  # summary, CSVs and figures

    def runs_of(self, variant: str) -> list[PlannedRun]:
        return [r for r in self.runs if r.variant.name == variant]


def check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in RESERVED:
            raise AblationError(f"override {item!r}: {key} is set by popo ablate ({RESERVED[key]})")


def plan(
    preset: str,
    drops: Sequence[str],
    seeds: int,
    baselines: Sequence[str] | str | None = (),
    overrides: Sequence[str] = (),
    root: str | Path = "ablations",
) -> Ablation:
    """Resolve every (variant, seed) config; no run starts and nothing is written."""
    from popo_core.algo.objective import build_objective

    variants = select_variants(drops, baselines)
    if seeds < 1:
        raise AblationError(f"--seeds {seeds}: need at least 1 seed")
    overrides = list(overrides)
    check_overrides(overrides)
    runs: list[PlannedRun] = []
    first_hash: dict[str, str] = {}
    for variant in variants:
        for seed in range(seeds):
            # Later overrides win: the variant's own keys over the user's, the seed over both.
            cfg = compose(preset, [*overrides, *variant.overrides, f"trainer.seed={seed}"])
            try:  # a variant its method cannot run fails now, not after the others trained
                build_objective(cfg.algo, group_size=cfg.rollout.group_size)
            except UserError as err:
                raise AblationError(f"{variant.name}: {err}") from None
            h = config_hash(cfg)
            if seed == 0:
                clash = next((name for name, other in first_hash.items() if other == h), None)
                if clash:
                    raise AblationError(
                        f"{variant.name} resolves to the same config as {clash} with these overrides: it would remove nothing"
                    )
                first_hash[variant.name] = h
            cfg.trainer.output_dir = str(Path(root) / preset / f"{variant.name}-seed{seed}-{h}")
            cfg.tracking.run_name = f"{variant.name}-seed{seed}"
            runs.append(PlannedRun(variant, seed, cfg, h))
    key = hashlib.sha256(" ".join(sorted(f"{r.name}:{r.config_hash}" for r in runs)).encode()).hexdigest()[:12]
    return Ablation(preset, overrides, seeds, variants, runs, key, Path(root) / preset / f"ablation-{key}")


# ------------------------------------------------------------------------------ running it
@dataclass
class RunOutcome:
    variant: str
    seed: int
    config_hash: str
    run_id: str | None
    output_dir: str
    final_accuracy: float | None
    final_reward: float | None
    source: str  # "trained" (from scratch) | "resumed" (from a checkpoint) | "reused" (finished before)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)


class Reporter:
    """Progress hooks for the CLI; every method is optional."""

    def on_plan(self, ablation: Ablation, found: dict[str, RunOutcome]) -> None: ...

    def run_callbacks(self, run: PlannedRun, index: int, total: int):  # -> popo_core.trainer.lifecycle.Callbacks | None
        return None

    def on_run_done(self, run: PlannedRun, outcome: RunOutcome) -> None: ...


def find_finished(run: PlannedRun) -> RunOutcome | None:
    """A FINISHED MLflow run with this run's config hash (which includes the seed), if any."""
    from popo_core import tracking

    t = run.cfg.tracking
    if not t.enabled:
        return None
    flt = f"tags.`popo.config_hash` = '{run.config_hash}' and tags.`popo.seed` = '{run.seed}' and attributes.status = 'FINISHED'"
    found = tracking.find_runs(t.uri, t.experiment, flt, max_results=1)
    if not found:
        return None
    mlflow_run = found[0]
    by_step: dict[int, dict[str, float]] = {}
    for key in ("reward/mean", "eval/accuracy"):
        # Each step is logged once (a resumed run does not resend the steps MLflow holds); keep the last value.
        for m in tracking.metric_history(t.uri, mlflow_run.info.run_id, key):
            by_step.setdefault(m.step, {"step": m.step})[key] = m.value
    history = [by_step[s] for s in sorted(by_step)]
    metrics = mlflow_run.data.metrics
    return RunOutcome(
        run.variant.name, run.seed, run.config_hash, mlflow_run.info.run_id,
        mlflow_run.data.tags.get("popo.output_dir", run.cfg.trainer.output_dir),
        metrics.get("final/accuracy"), metrics.get("reward/mean"), "reused", history,
    )


def _tag(run: PlannedRun, run_id: str | None, ablation_key: str) -> None:
    from popo_core import tracking

    t = run.cfg.tracking
    if not (t.enabled and run_id):
        return
    tags = {"popo.config_hash": run.config_hash, "popo.seed": str(run.seed), "popo.variant": run.variant.name,
            "popo.ablation": ablation_key}
    tracking.update_run(t.uri, run_id, tags=tags)


def train_one(run: PlannedRun, ablation_key: str, callbacks=None) -> RunOutcome:
    """Train (or resume, or pick up a finished output dir), then tag the MLflow run for matching."""
    from popo_core.trainer.lifecycle import TrainingRun
    from popo_core.trainer.loop import train

    training_run = TrainingRun(run.cfg, callbacks)  # checks the output directory at once
    resuming = training_run.resuming
    result = train(run.cfg, run=training_run)
    _tag(run, result.run_id, ablation_key)
    source = "reused" if result.resumed_complete else ("resumed" if resuming else "trained")
    return RunOutcome(
        run.variant.name, run.seed, run.config_hash, result.run_id, result.output_dir,
        result.final_accuracy, result.metrics.get("reward/mean"), source, result.history,
    )


@dataclass
class AblationResult:
    ablation: Ablation
    outcomes: list[RunOutcome]
    summaries: list["VariantSummary"]
    parent_run_id: str | None
    files: dict[str, str]

    @property
    def trained(self) -> int:
        return sum(o.source != "reused" for o in self.outcomes)


def run_ablation(ablation: Ablation, reporter: Reporter | None = None) -> AblationResult:
    """Reuse what MLflow already holds, train the rest one after another, then aggregate and log."""
    from popo_core.tracking import MlflowRun, find_runs

    from popo_core import preflight

    preflight.output_dir(ablation.output_dir, key="--output-dir")
    preflight.training(ablation.runs[0].cfg)  # before the parent run exists: a refused start leaves nothing
    reporter = reporter or Reporter()
    found = {r.name: o for r in ablation.runs if (o := find_finished(r)) is not None}
    reporter.on_plan(ablation, found)
    t = ablation.runs[0].cfg.tracking
    parents = find_runs(t.uri, t.experiment, f"tags.`popo.ablation_key` = '{ablation.key}'", max_results=1) if t.enabled else []
    parent = MlflowRun(
        uri=t.uri, experiment=t.experiment, enabled=t.enabled, run_id=parents[0].info.run_id if parents else None,
        run_name=f"ablate-{ablation.preset}-{ablation.key}", tags={"popo.ablation_key": ablation.key, "popo.preset": ablation.preset},
    )
    with parent:
        if not parents:
            parent.log_params(_parent_params(ablation))
        outcomes = []
        todo = [r for r in ablation.runs if r.name not in found]
        for run in ablation.runs:
            if run.name in found:
                outcome = found[run.name]
            else:
                run.cfg.tracking.parent_run_id = parent.run_id
                callbacks = reporter.run_callbacks(run, todo.index(run) + 1, len(todo))
                try:
                    outcome = train_one(run, ablation.key, callbacks)
                finally:
                    if hasattr(callbacks, "close"):
                        callbacks.close()
            outcomes.append(outcome)
            reporter.on_run_done(run, outcome)
        summaries = aggregate(ablation, outcomes)
        files = write_outputs(ablation, outcomes, summaries, parent.run_id)
        for path in files.values():
            parent.log_artifact(path)
        parent.log_metrics(_parent_metrics(summaries), ablation.runs[0].cfg.trainer.max_steps)
    return AblationResult(ablation, outcomes, summaries, parent.run_id, files)


def _parent_params(ablation: Ablation) -> dict[str, Any]:
    return {
        "ablate.preset": ablation.preset,
        "ablate.variants": ",".join(v.name for v in ablation.variants),
        "ablate.seeds": ablation.seeds,
        "ablate.overrides": " ".join(ablation.overrides) or "-",
        **{f"ablate.hash.{r.name}": r.config_hash for r in ablation.runs},
    }


def _parent_metrics(summaries: list["VariantSummary"]) -> dict[str, float]:
    out = {}
    for s in summaries:
        for name, stat in (("accuracy", s.accuracy), ("reward", s.reward), ("delta_accuracy", s.delta_accuracy),
                           ("delta_reward", s.delta_reward)):
            if stat is not None and stat.mean is not None:
                out[f"{s.name}/{name}"] = stat.mean
    return out


# ------------------------------------------------------------------------------ statistics
@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample standard deviation (ddof 1); None with a single value
    n: int


def describe(values: Sequence[float | None]) -> Stat:
    """Mean and sample std over seeds; None when any value is missing (no held-out set)."""
    if not values or any(v is None for v in values):
        return Stat(None, None, len(values))
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n)


@dataclass
class VariantSummary:
    name: str
    label: str
    changes: str
    accuracy: Stat
    reward: Stat
    delta_accuracy: Stat | None  # paired over seeds: variant - full POPO; None for full POPO itself
    delta_reward: Stat | None
    curve: list[tuple[int, float, float]]  # (step, mean, std) of eval/accuracy over seeds


def aggregate(ablation: Ablation, outcomes: Sequence[RunOutcome]) -> list[VariantSummary]:
    by = {(o.variant, o.seed): o for o in outcomes}
    seeds = range(ablation.seeds)
    full = [by[(FULL, s)] for s in seeds]
    out = []
    for v in ablation.variants:
        mine = [by[(v.name, s)] for s in seeds]
        deltas = None, None
        if v.name != FULL:
            deltas = tuple(
                describe([_minus(getattr(a, key), getattr(b, key)) for a, b in zip(mine, full)])
                for key in ("final_accuracy", "final_reward")
            )
        out.append(VariantSummary(
            v.name, v.label, v.changes, describe([o.final_accuracy for o in mine]), describe([o.final_reward for o in mine]),
            deltas[0], deltas[1], mean_curve([o.history for o in mine], "eval/accuracy"),
        ))
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def mean_curve(histories: Sequence[Sequence[dict]], key: str) -> list[tuple[int, float, float]]:
    """Mean and std over seeds at every step that all seeds logged `key` at."""
    per_run = [{h["step"]: h[key] for h in hist if key in h} for hist in histories]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    curve = []
    for step in steps:
        s = describe([p[step] for p in per_run])
        curve.append((int(step), s.mean, s.std or 0.0))
    return curve


# -------------------------------------------------------------------------------- outputs
def write_outputs(ablation: Ablation, outcomes: Sequence[RunOutcome], summaries: Sequence[VariantSummary],
                  parent_run_id: str | None) -> dict[str, str]:
    """summary.json, summary.csv (one row per variant), runs.csv (one per run) and the two figures."""
    from popo_core.plots import ablation_bars, ablation_curves

    out = ablation.output_dir
    out.mkdir(parents=True, exist_ok=True)
    budget = ablation.runs[0].cfg
    summary = {
        "preset": ablation.preset,
        "overrides": ablation.overrides,
        "seeds": list(range(ablation.seeds)),
        "ablation_key": ablation.key,
        "parent_run_id": parent_run_id,
        # Full POPO's resolved config (seed 0): every variant shares it but for its own keys.
        "base_config": {k: v for k, v in to_flat_dict(budget).items() if not k.startswith("tracking.") and k != "trainer.output_dir"},
        "statistics": "mean and sample std (ddof 1) over seeds; delta = variant - full POPO per seed (same seed), "
                      "then mean and sample std of those differences",
        "variants": [
            {**asdict(s), "overrides": list(v.overrides), "runs": [
                {k: val for k, val in asdict(o).items() if k != "history"} for o in outcomes if o.variant == s.name
            ]}
            for s, v in zip(summaries, ablation.variants)
        ],
    }
    files = {"summary.json": out / "summary.json", "summary.csv": out / "summary.csv", "runs.csv": out / "runs.csv"}
    files["summary.json"].write_text(json.dumps(summary, indent=1))
    with open(files["summary.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "changes", "seeds", "accuracy_mean", "accuracy_std", "reward_mean", "reward_std",
                    "delta_accuracy_mean", "delta_accuracy_std", "delta_reward_mean", "delta_reward_std"])
        for s in summaries:
            da, dr = s.delta_accuracy or Stat(None, None, 0), s.delta_reward or Stat(None, None, 0)
            w.writerow([s.name, s.changes, s.accuracy.n, s.accuracy.mean, s.accuracy.std, s.reward.mean, s.reward.std,
                        da.mean, da.std, dr.mean, dr.std])
    with open(files["runs.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "final_accuracy", "final_reward", "config_hash", "run_id", "output_dir", "source"])
        for o in outcomes:
            w.writerow([o.variant, o.seed, o.final_accuracy, o.final_reward, o.config_hash, o.run_id, o.output_dir, o.source])
    title = f"popo ablate {ablation.preset}: {budget.trainer.max_steps} steps"  # the figures add the seeds
    files["accuracy.png"] = ablation_bars(summaries, out / "accuracy.png", title=title)
    files["curves.png"] = ablation_curves(summaries, out / "curves.png", title=title)
    return {k: str(v) for k, v in files.items()}
