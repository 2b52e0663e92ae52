"""Search spaces of `popo sweep`: `experiments/sweep/<knob>.yaml`, composed by Hydra.

Each parameter is named by its config key (METHOD.md, "Names"), so the Optuna param, the Hydra
override and the MLflow param are one name. `all.yaml` joins the others through its defaults list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from popo_core.config import Config, config_dir, to_flat_dict
from popo_core.errors import UserError


class SweepError(UserError, ValueError):
    """Bad sweep input: knob, search space, trial count, sampler, pruner, storage, study or metric."""


@dataclass(frozen=True)
class Param:
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    grid: tuple | None = None  # the points `--sampler grid` visits

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


def knobs() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "sweep").glob("*.yaml"))


def load_space(knob: str) -> list[Param]:
    if knob not in knobs():
        raise SweepError(f"unknown knob {knob!r} (choose from: {', '.join(knobs())})")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        raw = OmegaConf.to_container(compose(f"sweep/{knob}"), resolve=True)
    where = f"sweep/{knob}.yaml"
    specs = ((raw or {}).get("sweep") or {}).get("params") or {}
    if not specs:
        raise SweepError(f"{where}: no params")
    keys = set(to_flat_dict(Config()))
    return [_param(where, name, dict(spec or {}), keys) for name, spec in specs.items()]


def _param(where: str, name: str, spec: dict, keys: set[str]) -> Param:
    if name not in keys:
        raise SweepError(f"{where}: {name} is not a config key")
    unknown = set(spec) - {"low", "high", "log", "choices", "grid"}
    if unknown:
        raise SweepError(f"{where}: {name}: unknown field {sorted(unknown)[0]!r}")
    grid = tuple(spec["grid"]) if spec.get("grid") is not None else None
    if spec.get("choices") is not None:
        return Param(name, choices=tuple(spec["choices"]), grid=grid or tuple(spec["choices"]))
    if spec.get("low") is None or spec.get("high") is None:
        raise SweepError(f"{where}: {name} needs low and high (or choices)")
    low, high, log = float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))
    if not low < high or (log and low <= 0):
        raise SweepError(f"{where}: {name}: need low < high{' and low > 0 for log' if log else ''}")
    if grid and not all(low <= float(g) <= high for g in grid):
        raise SweepError(f"{where}: {name}: grid points must lie in [{low:g}, {high:g}]")
    return Param(name, low, high, log, grid=tuple(float(g) for g in grid) if grid else None)


def set_key(cfg: Config, key: str, value: Any) -> None:
    """cfg.<key> = value for a dotted key such as algo.momentum."""
    node, _, leaf = key.rpartition(".")
    target = cfg
    for part in node.split(".") if node else ():
        target = getattr(target, part)
    setattr(target, leaf, value)
