"""PNG figures with matplotlib's Agg backend (no display needed).

Each figure is built by a `*_figure(s)` function that returns it (tests read its titles, labels and
markers) and saved by the function of the plain name, which the commands call. A figure names what
it shows (preset, method or study, step budget, seeds) so that it reads without the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from popo_core.errors import first_line

# Trial markers are coloured by trial number; Optuna's "Blues" draws the first trials almost white.
TRIAL_CMAP = "viridis"
MARKER_EDGE = "black"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(**kw):
    # A bare Figure (not pyplot's): nothing global to close, and tests can hold many.
    from matplotlib.figure import Figure

    return Figure(**kw)


def _save(fig, path: str | Path, **kw) -> Path:
    fig.savefig(path, dpi=110, **kw)
    return Path(path)


# ------------------------------------------------------------------------------ popo train
def training_figure(history: Sequence[Mapping[str, float]], title: str = "", max_steps: int | None = None):
    """Reward per step and held-out accuracy per evaluation, one figure.

    `title` names the run (preset / method); the step budget is added to it: `max_steps`, or the
    last logged step when the caller does not pass it.
    """
    fig = _figure(figsize=(7, 4))
    ax = fig.subplots()
    rewards = [h for h in history if "reward/mean" in h]
    ax.plot([h["step"] for h in rewards], [h["reward/mean"] for h in rewards], lw=1, alpha=0.6,
            label="reward/mean: mean reward of the step's completions")
    evals = [h for h in history if "eval/accuracy" in h]
    ax.plot([h["step"] for h in evals], [h["eval/accuracy"] for h in evals], "o-",
            label="eval/accuracy: accuracy on the held-out problems")
    steps = max_steps if max_steps is not None else max((h["step"] for h in history), default=0)
    budget = f"{int(steps)} steps"
    ax.set(xlabel="step", ylabel="reward / accuracy", ylim=(-0.02, 1.02),
           title=f"{title}: {budget}" if title else budget)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def training_curves(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "",
                    max_steps: int | None = None) -> Path:
    return _save(training_figure(history, title, max_steps), path)


# ------------------------------------------------------------------------------ popo ablate
def _variant_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _n_seeds(summaries: Sequence) -> int:
    return max((max(s.accuracy.n, s.reward.n) for s in summaries), default=0)


def _spread(summaries: Sequence, drawn_as: str) -> str:
    """What the figure's spread shows; with one seed there is none to show."""
    n = _n_seeds(summaries)
    return f"{n} seeds: mean ± std over seeds ({drawn_as})" if n > 1 else f"{n} seed{'s' * (n != 1)}: no spread shown"


def ablation_bars_figure(summaries: Sequence, title: str = ""):
    """Final held-out accuracy and final reward per variant: the mean, and std error bars over seeds.

    Each summary has `label`, and `accuracy` / `reward` with `mean`, `std` (None when missing or
    with a single seed: then no error bar is drawn) and `n`. The first is the reference (full
    POPO); a dashed line marks its mean. `title` names the preset and budget.
    """
    fig = _figure(figsize=(max(7.0, 1.3 * len(summaries) + 3), 4.4))
    axes = fig.subplots(1, 2)
    labels = [s.label for s in summaries]
    colors = _variant_colors(len(summaries))
    many = _n_seeds(summaries) > 1
    for ax, key, name in ((axes[0], "accuracy", "final eval/accuracy"), (axes[1], "reward", "final reward/mean")):
        stats = [getattr(s, key) for s in summaries]
        means = [st.mean if st.mean is not None else float("nan") for st in stats]
        errs = [st.std or 0.0 for st in stats]
        spread = many and any(st.std is not None for st in stats)
        ax.bar(range(len(labels)), means, yerr=errs if spread else None, capsize=4, color=colors, alpha=0.85)
        if means and means[0] == means[0]:
            ax.axhline(means[0], color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set(xlabel="variant", ylabel=name + (" (mean over seeds)" if many else ""), ylim=(0, 1.05))
        ax.grid(axis="y", alpha=0.3)
    spread = _spread(summaries, "bar: mean, whiskers: ± std")
    fig.suptitle(f"{title}\n{spread}" if title else spread, fontsize=10)
    fig.tight_layout()
    return fig


def ablation_bars(summaries: Sequence, path: str | Path, title: str = "") -> Path:
    """`popo ablate`: accuracy.png."""
    return _save(ablation_bars_figure(summaries, title), path)


def ablation_curves_figure(summaries: Sequence, title: str = ""):
    """Held-out accuracy against step for every variant: the mean over seeds, and a std band when
    there are two seeds or more. Each summary has `label` and `curve`: (step, mean, std) triples."""
    fig = _figure(figsize=(7.5, 4.7))
    ax = fig.subplots()
    many = _n_seeds(summaries) > 1
    for s, color in zip(summaries, _variant_colors(len(summaries))):
        if not s.curve:
            continue
        steps, means, stds = zip(*s.curve)
        ax.plot(steps, means, "o-", ms=3, lw=1.5, color=color, label=s.label)
        if many:
            ax.fill_between(steps, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                            color=color, alpha=0.12, lw=0)
    spread = _spread(summaries, "line: mean, band: ± std")
    ax.set(xlabel="step", ylabel="eval/accuracy (mean over seeds)" if many else "eval/accuracy",
           ylim=(-0.02, 1.02), title=f"{title}\n{spread}" if title else spread)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def ablation_curves(summaries: Sequence, path: str | Path, title: str = "") -> Path:
    """`popo ablate`: curves.png."""
    return _save(ablation_curves_figure(summaries, title), path)


# ------------------------------------------------------------------------------ popo sweep
def _figure_of(axes):
    import numpy as np

    return np.asarray(axes, dtype=object).flat[0].figure


def _every_trial_visible(fig, white_faces: bool = False) -> None:
    """Dark edges on every trial marker, and a trial-number colormap without a white end."""
    from matplotlib.collections import PathCollection

    for ax in fig.axes:
        for dots in ax.collections:
            if not isinstance(dots, PathCollection):
                continue
            if dots.get_array() is not None:  # coloured by trial number (the slice plot)
                dots.set_cmap(TRIAL_CMAP)
            elif white_faces:  # the contour's black dots vanish on its dark-blue best region
                dots.set_facecolor("white")
            dots.set_edgecolor(MARKER_EDGE)
            dots.set_linewidth(0.8)


def _readable_log_ticks(fig) -> None:
    """Plain numbers on log axes, at powers of ten or, where fewer than two fall in range, at 1, 2 and
    5 times them; matplotlib labels every minor tick of a range under a decade, and those labels run
    into each other (and a linear locator on a log axis crowds its labels at one end)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() != "log" or min(lim) <= 0:
                continue
            lo, hi = sorted(lim)
            powers = LogLocator(subs=(1.0,))
            two = sum(lo <= t <= hi for t in powers.tick_values(lo, hi)) >= 2
            axis.set_major_locator(powers if two else LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())


def _retitle(fig, title: str, target_name: str, name: str) -> None:
    """Optuna's stock titles ("Slice Plot", ...) give way to one naming the study and what is drawn."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        for loc in ("left", "center", "right"):
            ax.set_title("", loc=loc)
    if name == "history":
        ax = fig.axes[0]
        ax.set(xlabel="trial number", ylabel=target_name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, [{"Best Value": "best so far"}.get(x, x) for x in labels],
                      loc="upper left", bbox_to_anchor=(1.02, 1.0))
    elif name == "importances":
        fig.axes[0].set(xlabel=f"importance for {target_name} (fANOVA)", ylabel="parameter")
    elif name == "slice":
        for bar in {c.colorbar for ax in fig.axes for c in ax.collections if getattr(c, "colorbar", None)}:
            bar.set_label("trial number")
            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
    what = {
        "history": f"{target_name} of each trial, and the best so far",
        "slice": f"{target_name} against each parameter (colour: trial number)",
        "contour": f"{target_name} over each pair of parameters (dots: trials)",
        "importances": f"how much each parameter explains of {target_name}",
    }[name]
    fig.suptitle(f"{title}\n{what}", fontsize=10)


def sweep_title(study_name: str, preset: str | None = None, max_steps: int | None = None) -> str:
    """The study, its preset and each trial's step budget: the first line of every sweep figure."""
    parts = [f"sweep {study_name}"]
    if preset:
        parts.append(f"preset {preset}")
    if max_steps is not None:
        parts.append(f"{max_steps} steps per trial")
    return ", ".join(parts)


def sweep_figures(study, params: Sequence[str], target_name: str = "value", preset: str | None = None,
                  max_steps: int | None = None) -> tuple[dict, list[str]]:
    """Optuna's matplotlib figures of a study, retitled, by name; and notes on any skipped.

    optimisation history, one slice per parameter, contours for two or more parameters, and
    fANOVA parameter importances (undefined with fewer than 2 complete trials or a single parameter).
    The figures are pyplot's: close them (sweep_plots does).
    """
    import warnings

    import matplotlib
    import optuna
    from optuna.visualization import matplotlib as ovm

    plt = _pyplot()
    params = list(params)
    title = sweep_title(study.study_name, preset, max_steps)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    draws = {
        "history": lambda: ovm.plot_optimization_history(study, target_name=target_name),
        "slice": lambda: ovm.plot_slice(study, params=params, target_name=target_name),
    }
    notes = []
    if len(params) > 1:
        draws["contour"] = lambda: ovm.plot_contour(study, params=params, target_name=target_name)
    if len(complete) < 2:
        notes.append(f"importances skipped: {len(complete)} complete trial(s), need 2")
    elif len(params) < 2:
        notes.append("importances skipped: one parameter (its importance is 1 by definition)")
    elif len({t.value for t in complete}) < 2:
        notes.append(f"importances skipped: every complete trial has the same {target_name}")
    else:
        # fANOVA's forest is random: seeded, the figure and a rerun (or a table redrawn from it) agree.
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        draws["importances"] = lambda: ovm.plot_param_importances(study, evaluator=evaluator, target_name=target_name)
    figures = {}
    n = len(params)
    for name, draw in draws.items():
        before = set(plt.get_fignums())
        try:
            # Optuna switches pyplot to its ggplot style for good: keep that to these figures.
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")  # ExperimentalWarning, and matplotlib's on empty data
                fig = _figure_of(draw())
                if name == "slice" and n > 1:
                    fig.set_size_inches(4.0 * n, 4.4)
                elif name == "contour":  # an n x n grid of panels: room for their axis labels
                    fig.set_size_inches(3.8 * n + 1.5, 3.4 * n + 0.6)
                _every_trial_visible(fig, white_faces=name == "contour")
                _readable_log_ticks(fig)
                _retitle(fig, title, target_name, name)
        except Exception as err:
            for num in set(plt.get_fignums()) - before:  # the failed figure's, not those already drawn
                plt.close(num)
            notes.append(f"{name} plot skipped: {first_line(err)}")
            continue
        figures[name] = fig
    return figures, notes


def sweep_plots(study, out_dir: str | Path, params: Sequence[str], target_name: str = "value",
                preset: str | None = None, max_steps: int | None = None) -> tuple[list[Path], list[str]]:
    """`popo sweep`: the figures of sweep_figures as PNGs in out_dir, and notes on any skipped."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures, notes = sweep_figures(study, params, target_name, preset, max_steps)
    paths = []
    for name, fig in figures.items():
        paths.append(_save(fig, out / f"{name}.png", bbox_inches="tight"))
        plt.close(fig)
    return paths, notes
