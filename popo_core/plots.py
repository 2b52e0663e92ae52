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


def _variant_colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def ablation_bars(summaries: Sequence, path: str | Path, title: str = "") -> Path:
    """`popo ablate`: final held-out accuracy and final reward per variant, mean with std error bars.

    Each summary has `label`, and `accuracy` / `reward` with `mean`, `std` (None when missing).
    The first is the reference (full POPO); a dashed line marks its mean.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.3 * len(summaries) + 3), 4.2))
    labels = [s.label for s in summaries]
    colors = _variant_colors(len(summaries))
    for ax, key, name in ((axes[0], "accuracy", "final eval/accuracy"), (axes[1], "reward", "final reward/mean")):
        stats = [getattr(s, key) for s in summaries]
        means = [st.mean if st.mean is not None else float("nan") for st in stats]
        errs = [st.std or 0.0 for st in stats]
        ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color=colors, alpha=0.85)
        if means and means[0] == means[0]:
            ax.axhline(means[0], color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set(ylabel=name, ylim=(0, 1.05))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}: mean ± std over seeds" if title else "mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def ablation_curves(summaries: Sequence, path: str | Path, title: str = "") -> Path:
    """`popo ablate`: held-out accuracy against step for every variant, mean over seeds +- std band.

    Each summary has `label` and `curve`: (step, mean, std) triples.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for s, color in zip(summaries, _variant_colors(len(summaries))):
        if not s.curve:
            continue
        steps, means, stds = zip(*s.curve)
        ax.plot(steps, means, "o-", ms=3, lw=1.5, color=color, label=s.label)
        ax.fill_between(steps, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                        color=color, alpha=0.12, lw=0)
    ax.set(xlabel="step", ylabel="eval/accuracy (mean over seeds)", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
