"""PNG figures with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Reward per step and held-out accuracy per evaluation, one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "reward/mean" in h]
    ax.plot(steps, [h["reward/mean"] for h in history if "reward/mean" in h], lw=1, alpha=0.6, label="reward/mean")
    evals = [h for h in history if "eval/accuracy" in h]
    ax.plot([h["step"] for h in evals], [h["eval/accuracy"] for h in evals], "o-", label="eval/accuracy")
    ax.set(xlabel="step", ylabel="value", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
