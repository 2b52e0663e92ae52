"""What a study's trials were run with, and the check that a later command matches it.

Trials are comparable only if they share the search space and every config key that fixes what a
trial computes: the preset, the overrides (the budget `trainer.max_steps`, batch sizes, the task,
...), the metric and its direction. The first command records them on the Optuna study (user attrs
`popo.*`); every later command on that study is checked before it runs a trial or opens an MLflow
run, and refused on one line naming the keys that differ. `--trials`, the sampler, the pruner and
the seed may change: they say how many points and which, not what a trial is.
"""

from __future__ import annotations

import json
from typing import Any

from popo_core.config import Config, compose, to_flat_dict
from popo_core.sweep.space import Param, is_file, knob_label

# Where a trial runs and logs, and how much memory it takes, not what it computes: workers on
# different machines may differ here (their own trainer.threads, a tracking server, a GPU's size).
PLACEMENT = ("trainer.output_dir", "trainer.threads", "trainer.device", "trainer.micro_batch_size", "tracking.",
             "rollout.gpu_memory_utilization", "rollout.kv_cache_memory_bytes", "rollout.sleep_level",
             "rollout.enforce_eager", "rollout.tensor_parallel_size")
_NAMED = (("popo.knob", "knob", "knob"), ("popo.preset", "preset", "preset"),
          ("popo.metric", "metric", "--metric"), ("popo.direction", "direction", "--direction"))
_SHOWN = 3  # differing keys a refusal names; the rest are counted


def trial_config(cfg: Config, space: list[Param]) -> dict[str, Any]:
    """The keys that fix a trial, as JSON stores them; the swept keys are the space's, not the config's."""
    swept = {p.name for p in space}
    flat = {k: v for k, v in to_flat_dict(cfg).items() if k not in swept and not k.startswith(PLACEMENT)}
    return json.loads(json.dumps(flat))


def space_record(space: list[Param]) -> list[dict[str, Any]]:
    """The space as the study keeps it, however it was given (a shipped knob, a file, --param):
    one entry per parameter. The grid is left out: it is where `--sampler grid` looks inside the
    space, not the space. `int` is written only for an integer range (records made before it
    existed stay equal)."""
    return [{"name": p.name, "low": p.low, "high": p.high, "log": p.log,
             "choices": list(p.choices) if p.choices is not None else None, **({"int": True} if p.integer else {})}
            for p in space]


def space_source(knob: str, params: list[str] | tuple[str, ...]) -> str:
    """Where a space came from, as a message names it: `experiments/sweep/lr.yaml + --param ...`."""
    where = knob if is_file(knob) else f"experiments/sweep/{knob}.yaml"
    return where + "".join(f" + --param {p}" for p in params)


def record(knob: str, preset: str, overrides: list[str], metric: str, direction: str, space: list[Param],
           cfg: Config, params: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The user attrs that say what a study's trials are (`popo.overrides` and `popo.params` as
    typed, for the reader; `popo.space` is what is compared)."""
    return {"popo.knob": knob_label(knob), "popo.preset": preset, "popo.overrides": " ".join(overrides),
            "popo.params": " ".join(params), "popo.metric": metric, "popo.direction": direction,
            "popo.space": space_record(space), "popo.config": trial_config(cfg, space)}


def legacy_config(held: dict[str, Any], space: list[Param]) -> dict[str, Any] | None:
    """A study recorded before `popo.config` existed kept its first command's preset and overrides:
    compose them again (with today's defaults); None when they are missing or no longer compose."""
    if "popo.preset" not in held or "popo.overrides" not in held:
        return None
    try:
        return trial_config(compose(held["popo.preset"], held["popo.overrides"].split()), space)
    except Exception:
        return None


def mismatch(study: str, held: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """The one-line refusal of a command whose study's trials were run with other settings, else None.
    Only what both sides recorded is compared (a key added to or removed from Config since is no
    difference)."""
    for key, name, what in _NAMED:
        if key in held and held[key] != mine[key]:
            return _refusal(study, [f"{name}={held[key]}"], [f"{name}={mine[key]}"], what)
    if "popo.space" in held and held["popo.space"] != mine["popo.space"]:
        old, new = ({d["name"]: _describe(d) for d in side} for side in (held["popo.space"], mine["popo.space"]))
        names = [n for n in dict.fromkeys([*old, *new]) if old.get(n) != new.get(n)]
        source = space_source(mine["popo.knob"], mine.get("popo.params", "").split())
        return _refusal(study, [old.get(n, f"no {n}") for n in names], [new.get(n, f"no {n}") for n in names],
                        f"search space (this command's is {source})", sep=", ")
    if "popo.config" in held:
        old, new = held["popo.config"], mine["popo.config"]
        typed = {o.split("=", 1)[0] for side in (held, mine) for o in side.get("popo.overrides", "").split()}
        keys = sorted((k for k in new if k in old and old[k] != new[k]), key=lambda k: k not in typed)  # typed first
        if keys:
            return _refusal(study, [f"{k}={_value(old[k])}" for k in keys], [f"{k}={_value(new[k])}" for k in keys],
                            "overrides")
    return None


def _refusal(study: str, old: list[str], new: list[str], what: str, sep: str = " ") -> str:
    more = f" (and {len(old) - _SHOWN} more)" if len(old) > _SHOWN else ""
    return (f"study {study} was run with {sep.join(old[:_SHOWN])}; this command has {sep.join(new[:_SHOWN])}{more}: "
            f"rerun with the same {what}, or pick another --study")


def _describe(d: dict[str, Any]) -> str:
    choices = tuple(d["choices"]) if d.get("choices") is not None else None
    return Param(d["name"], d.get("low"), d.get("high"), bool(d.get("log")), choices, integer=bool(d.get("int"))).describe()


def _value(v: Any) -> str:
    """A value as the override that sets it would spell it."""
    return json.dumps(v) if v is None or isinstance(v, (bool, list)) else str(v)
