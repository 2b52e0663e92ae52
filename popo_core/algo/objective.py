"""The objective: a registered method's policy loss plus the siamese penalty, bound to `algo.*`.

It reads the registries (`popo_core.algo.losses.METHODS`, `popo_core.algo.siamese.PENALTIES`) and never
branches on a method's name: the trainer asks it which completions to forward, which networks it
needs, and for the step's quantities, the loss and the penalty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

from torch import Tensor

from popo_core.algo.choices import Needs, method_name
from popo_core.algo.losses import METHODS, Method, StepQuantities
from popo_core.errors import ConfigError
from popo_core.algo.siamese import PENALTIES, Penalty


@dataclass(frozen=True)
class Objective:
    method: Method
    knobs: dict = field(repr=False)  # the algo.* settings the method reads
    needs: Needs
    siamese: bool  # a momentum network (and, with a penalty, the siamese penalty)
    penalty: Penalty | None  # over the method's penalised completions, before its weight
    penalty_weight: float
    penalty_knobs: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def policy_loss(self) -> Callable[..., tuple[Tensor, dict[str, float]]]:
        return partial(self.method.loss, **self.knobs)

    def quantities(self, rewards: Tensor, group_ids: Tensor, lengths: Tensor,
                   seq_log_ratio: Tensor | None = None) -> StepQuantities:
        """The quantities of one optimizer step, over every completion of that step."""
        return self.method.quantities(rewards, group_ids, lengths, seq_log_ratio=seq_log_ratio, **self.knobs)

    def forwarded(self, rewards: Tensor) -> Tensor:
        return self.method.forwarded(rewards)

    def penalised(self, rewards: Tensor) -> Tensor:
        return self.method.penalised(rewards)

    def penalty_fn(self) -> Callable[..., tuple[Tensor, dict[str, float]]] | None:
        return partial(self.penalty.fn, **self.penalty_knobs) if self.penalty else None


def build_objective(algo, *, group_size: int | None = None) -> Objective:
    """Map an AlgoConfig (or anything with its attributes) to an Objective; a setting the method
    cannot take is a ConfigError naming its key."""
    name = method_name(algo)
    if name not in METHODS:
        if algo.use_negatives:
            raise ConfigError(f"algo.use_negatives=true: {algo.name} has no positive-only ablation (popo has)")
        raise ConfigError(f"algo.name={algo.name}: not a registered method (choose from: "
                          f"{', '.join(n for n in METHODS if '+' not in n)})")
    settings = asdict(algo) if hasattr(algo, "__dataclass_fields__") else dict(vars(algo))
    method = METHODS[name]
    knobs = {k: settings[k] for k in method.knobs}
    needs = method.needs(knobs)
    if group_size is not None and group_size < needs.min_group_size:
        raise ConfigError(f"rollout.group_size={group_size}: must be >= {needs.min_group_size} for {name} "
                          "(group-normalised advantages)")
    penalty = PENALTIES[algo.penalty] if algo.siamese and algo.penalty_weight > 0 else None
    return Objective(
        method=method,
        knobs=knobs,
        needs=needs,
        siamese=bool(algo.siamese),
        penalty=penalty,
        penalty_weight=algo.penalty_weight if penalty else 0.0,
        penalty_knobs={k: settings[k] for k in penalty.knobs} if penalty else {},
    )
