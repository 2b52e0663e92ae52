"""Search spaces of `popo sweep`: a named space (`experiments/sweep/<knob>.yaml`, composed by Hydra),
a user's own YAML file in the same format, and `--param` specs that add to either or replace one
of its parameters.

Each parameter is named by its config key (METHOD.md, "Names"), so the Optuna param, the Hydra
override and the MLflow param are one name. `all.yaml` joins the others through its defaults list;
a user's file may name shipped spaces in a `defaults:` list the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popo_core.config import Config, ConfigError, config_dir, did_you_mean, resolve
from popo_core.errors import UserError

_SCALARS = (bool, int, float, str)
_FIELDS = {"low", "high", "log", "choices", "grid"}


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
    integer: bool = False  # a range over an int key: whole numbers only

    def distribution(self):
        """The Optuna distribution `suggest` draws from (a study rebuilt from its trials' table needs it)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        kind = " log" if self.log else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}]{' int' if self.integer else ''}{kind}"


def knobs() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "sweep").glob("*.yaml"))


def is_file(knob: str) -> bool:
    """A knob argument naming a YAML file (a user's own space) rather than a shipped space."""
    return knob.endswith((".yaml", ".yml")) or "/" in knob


def knob_label(knob: str) -> str:
    """What a study records as its knob: the shipped space's name, or the file's name (not its
    path, so a rerun from another directory is the same study)."""
    return Path(knob).name if is_file(knob) else knob


def knob_stem(knob: str) -> str:
    """The knob as the default study name spells it (`<stem>-<preset>`)."""
    return Path(knob).stem if is_file(knob) else knob


def key_types() -> dict[str, tuple[type | None, bool]]:
    """Every scalar config key -> (its type, whether it may be null); None for a non-scalar (a list)."""
    out: dict[str, tuple[type | None, bool]] = {}

    def walk(prefix: str, cls) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, key = hints[f.name], f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hint):
                walk(f"{key}.", hint)
                continue
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            nullable = type(None) in typing.get_args(hint)
            base = args[0] if nullable and len(args) == 1 else hint
            out[key] = (base if base in _SCALARS else None, nullable)

    walk("", Config)
    return out


def load_space(knob: str, params: list[str] | tuple[str, ...] = ()) -> list[Param]:
    """The search space of a shipped knob or a YAML file, with `--param` specs added or replacing."""
    types = key_types()
    space = _load_file(knob, types) if is_file(knob) else _load_named(knob, types)
    for spec in params:
        p = parse_param(spec, types)
        at = next((i for i, q in enumerate(space) if q.name == p.name), None)
        if at is None:
            space.append(p)
        else:
            space[at] = p
    return space


def _load_named(knob: str, types) -> list[Param]:
    if knob not in knobs():
        raise SweepError(f"unknown knob {knob!r}{did_you_mean(knob, knobs())} (choose from: {', '.join(knobs())}, "
                         "or a YAML file of your own)")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        raw = OmegaConf.to_container(compose(f"sweep/{knob}"), resolve=True)
    return _params(f"sweep/{knob}.yaml", ((raw or {}).get("sweep") or {}).get("params"), types)


def _load_file(path: str, types) -> list[Param]:
    """A user's space: `params:` as in experiments/sweep/*.yaml, and optionally `defaults:` naming
    shipped spaces (their params first; this file's replace theirs)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SweepError(f"{path}: no such file (a search space is a shipped knob, {', '.join(knobs())}, "
                         "or a YAML file)")
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise SweepError(f"{path}: not readable YAML: {first}") from None
    if not isinstance(raw, dict) or set(raw) - {"params", "defaults"}:
        extra = sorted(set(raw) - {"params", "defaults"}) if isinstance(raw, dict) else None
        raise SweepError(f"{path}: " + (f"unknown field {extra[0]!r}" if extra else "expected a mapping")
                         + " (a search space holds params: and optionally defaults:)")
    space: list[Param] = []
    for name in raw.get("defaults") or []:
        if name == "_self_":
            continue
        if not isinstance(name, str) or name not in knobs():
            raise SweepError(f"{path}: defaults: {name!r} is not a shipped space (choose from: {', '.join(knobs())})")
        space.extend(q for q in _load_named(name, types) if q.name not in {p.name for p in space})
    own = _params(path, raw.get("params"), types, allow_empty=bool(space))
    names = {p.name for p in own}
    return [q for q in space if q.name not in names] + own


def _params(where: str, specs, types, allow_empty: bool = False) -> list[Param]:
    if specs is not None and not isinstance(specs, dict):
        raise SweepError(f"{where}: params must map config keys to ranges")
    if not specs and not allow_empty:
        raise SweepError(f"{where}: no params")
    return [_param(where, name, spec, types) for name, spec in (specs or {}).items()]


def _key_type(where: str, name: str, types) -> tuple[type, bool]:
    if name not in types:
        raise SweepError(f"{where}: unknown key {name}{did_you_mean(name, list(types))}")
    kind, nullable = types[name]
    if kind is None:
        raise SweepError(f"{where}: {name} is not a single value (a list): it cannot be swept")
    return kind, nullable


def _param(where: str, name: str, spec: Any, types) -> Param:
    kind, nullable = _key_type(where, name, types)
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: {name}: expected low/high (or choices), got {spec!r}")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise SweepError(f"{where}: {name}: unknown field {sorted(unknown)[0]!r}{did_you_mean(sorted(unknown)[0], sorted(_FIELDS))}")
    if spec.get("choices") is not None:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise SweepError(f"{where}: {name}: choices must be a non-empty list")
        choices = tuple(_typed_choice(where, name, v, kind, nullable) for v in spec["choices"])
        grid = tuple(spec["grid"]) if spec.get("grid") is not None else choices
        return Param(name, choices=choices, grid=grid)
    if spec.get("low") is None or spec.get("high") is None:
        raise SweepError(f"{where}: {name} needs low and high (or choices)")
    grid = spec.get("grid")
    return _range(where, name, kind, spec["low"], spec["high"], bool(spec.get("log", False)),
                  tuple(grid) if grid is not None else None)


def _range(where: str, name: str, kind: type, low: Any, high: Any, log: bool, grid: tuple | None) -> Param:
    if kind not in (int, float):
        raise SweepError(f"{where}: {name} is a {kind.__name__}: give choices, not a range")
    integer = kind is int
    try:
        if integer and not all(isinstance(v, int) and not isinstance(v, bool) or
                               (isinstance(v, str) and v.strip().lstrip("+-").isdigit()) for v in (low, high)):
            raise ValueError
        low, high = (int(v) for v in (low, high)) if integer else (float(v) for v in (low, high))
    except (TypeError, ValueError):
        raise SweepError(f"{where}: {name}: low and high must be {'integers' if integer else 'numbers'} "
                         f"({name} is {'an int' if integer else 'a float'}), got {low!r} and {high!r}") from None
    if not low < high:
        raise SweepError(f"{where}: {name}: need low < high, got {low:g} >= {high:g}")
    if log and low <= 0:
        raise SweepError(f"{where}: {name}: a log range needs low > 0, got {low:g}")
    if grid:
        try:
            grid = tuple(kind(g) for g in grid)
        except (TypeError, ValueError):
            raise SweepError(f"{where}: {name}: grid points must be numbers") from None
        if not all(low <= g <= high for g in grid):
            raise SweepError(f"{where}: {name}: grid points must lie in [{low:g}, {high:g}]")
    return Param(name, float(low), float(high), log, grid=grid or None, integer=integer)


def _typed_choice(where: str, name: str, value: Any, kind: type, nullable: bool) -> Any:
    """A categorical value as the key's type, from YAML (already typed) or from --param (a string)."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and (kind is not str or nullable)):
        if nullable:
            return None
        raise SweepError(f"{where}: {name} takes {_a(kind)}, not null")
    if isinstance(value, str) and kind is not str:
        parsed = _parse(value, kind)
    else:
        parsed = value if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)) else None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            parsed = float(value)
    if parsed is None:
        raise SweepError(f"{where}: {name} takes {_a(kind)}, not {value!r}")
    return parsed


def _parse(text: str, kind: type) -> Any:
    if kind is bool:
        return {"true": True, "false": False}.get(text.strip().lower())
    try:
        return kind(text.strip())
    except ValueError:
        return None


def _a(kind: type) -> str:
    return {"int": "an int", "float": "a float", "bool": "a bool (true or false)", "str": "a string"}[kind.__name__]


def parse_param(spec: str, types=None) -> Param:
    """`KEY=LOW:HIGH[:log]` (a float or int range) or `KEY=a,b,c` (categorical, typed as the key)."""
    types = types if types is not None else key_types()
    where = f"--param {spec}"
    key, eq, value = spec.partition("=")
    key = key.strip()
    if not eq or not key or not value.strip():
        raise SweepError(f"{where}: expected KEY=LOW:HIGH[:log] or KEY=a,b,c")
    kind, nullable = _key_type(where, key, types)
    if "," in value:
        items = [v.strip() for v in value.split(",")]
        if any(not v for v in items) and kind is not str:
            raise SweepError(f"{where}: an empty choice")
        choices = tuple(_typed_choice(where, key, v, kind, nullable) for v in items)
        if len(set(map(repr, choices))) < len(choices):
            raise SweepError(f"{where}: a choice is repeated")
        return Param(key, choices=choices, grid=choices)
    parts = value.split(":")
    if len(parts) in (2, 3) and kind in (int, float):
        if len(parts) == 3 and parts[2].strip() != "log":
            raise SweepError(f"{where}: the third field may only be 'log', got {parts[2]!r}")
        return _range(where, key, kind, parts[0].strip(), parts[1].strip(), len(parts) == 3, None)
    if kind in (int, float):
        raise SweepError(f"{where}: expected a range LOW:HIGH[:log] or choices a,b,c (one value is an override: "
                         f"{key}={value} without --param)")
    raise SweepError(f"{where}: {key} is {_a(kind)}: give choices a,b,c (one value is an override: {key}={value} "
                     "without --param)")


def check_against(space: list[Param], base: Config, source: str) -> None:
    """Refuse a space whose ends (or choices) the config itself refuses (`algo.momentum=0.5:1.5`),
    before any trial runs: each is set on the base config (as compose_unresolved gives it) and resolved."""
    for p in space:
        for value in p.choices if p.choices is not None else (p.low, p.high):
            if p.integer and value is not None:
                value = int(value)
            cfg = copy.deepcopy(base)
            set_key(cfg, p.name, value)
            try:
                resolve(cfg)
            except ConfigError as err:
                raise SweepError(f"{source}: {p.describe()}: {err}") from None


def set_key(cfg: Config, key: str, value: Any) -> None:
    """cfg.<key> = value for a dotted key such as algo.momentum."""
    node, _, leaf = key.rpartition(".")
    target = cfg
    for part in node.split(".") if node else ():
        target = getattr(target, part)
    setattr(target, leaf, value)
