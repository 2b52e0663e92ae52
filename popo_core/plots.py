"""PNG figures with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from popo_core.errors import first_line


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


def _figure_of(axes):
    import numpy as np

    return np.asarray(axes, dtype=object).flat[0].figure


def sweep_plots(study, out_dir: str | Path, params: Sequence[str], target_name: str = "value") -> tuple[list[Path], list[str]]:
    """`popo sweep`: Optuna's matplotlib figures of a study as PNGs in out_dir, and notes on any skipped.

    optimisation history, one slice per parameter, contours for two or more parameters, and
    fANOVA parameter importances (undefined with fewer than 2 complete trials or a single parameter).
    """
    import warnings

    import optuna
    from optuna.visualization import matplotlib as ovm

    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = list(params)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    figures = {
        "history": lambda: ovm.plot_optimization_history(study, target_name=target_name),
        "slice": lambda: ovm.plot_slice(study, params=params, target_name=target_name),
    }
    notes = []
    if len(params) > 1:
        figures["contour"] = lambda: ovm.plot_contour(study, params=params, target_name=target_name)
    if len(complete) < 2:
        notes.append(f"importances skipped: {len(complete)} complete trial(s), need 2")
    elif len(params) < 2:
        notes.append("importances skipped: one parameter (its importance is 1 by definition)")
    elif len({t.value for t in complete}) < 2:
        notes.append(f"importances skipped: every complete trial has the same {target_name}")
    else:
        figures["importances"] = lambda: ovm.plot_param_importances(study, target_name=target_name)
    paths = []
    for name, draw in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, and matplotlib's on empty data
                fig = _figure_of(draw())
                n = len(params)
                if name == "slice" and n > 1:
                    fig.set_size_inches(4.0 * n, 4.0)
                elif name == "contour":  # an n x n grid of panels: room for their axis labels
                    fig.set_size_inches(3.8 * n + 1.5, 3.4 * n)
        except Exception as err:
            plt.close("all")
            notes.append(f"{name} plot skipped: {first_line(err)}")
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths, notes
