"""popo_core/plots.py: every figure reads without the command line.

Checked on the matplotlib Figures the `*_figure(s)` functions build (the PNGs are those saved):
titles name the preset, method or study, budget and seeds; axes are labelled; one seed draws no
spread; sweep figures lose Optuna's stock titles, count trials in integers and show every trial.
"""

from __future__ import annotations

import pytest
from matplotlib.collections import LineCollection, PathCollection, PolyCollection
from matplotlib.colors import to_rgba_array
from matplotlib.container import ErrorbarContainer

from popo_core import plots
from popo_core.ablate import Stat, VariantSummary

HISTORY = [{"step": s, "reward/mean": s / 40} | ({"eval/accuracy": s / 50} if s % 10 == 0 else {}) for s in range(41)]


def texts(fig) -> str:
    """Every title of a figure: its suptitle and each axes' titles, one string."""
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    parts += [ax.get_title(loc) for ax in fig.axes for loc in ("left", "center", "right")]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ training curves
def test_training_curves_name_the_run_its_budget_and_both_series(tmp_path):
    fig = plots.training_figure(HISTORY, title="tiny / popo", max_steps=200)
    ax = fig.axes[0]
    assert "tiny / popo" in ax.get_title() and "200 steps" in ax.get_title()
    assert ax.get_xlabel() == "step"
    assert ax.get_ylabel() not in ("", "value") and "reward" in ax.get_ylabel() and "accuracy" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 2 and legend[0].startswith("reward/mean") and legend[1].startswith("eval/accuracy")
    # Without a budget from the caller, the last logged step stands for it.
    assert "40 steps" in plots.training_figure(HISTORY, title="tiny / popo").axes[0].get_title()
    assert plots.training_curves(HISTORY, tmp_path / "curves.png", "tiny / popo").stat().st_size > 0


# ------------------------------------------------------------------------------ ablation
def summaries(seeds: int) -> list[VariantSummary]:
    std = 0.05 if seeds > 1 else None  # what ablate.describe gives: no std of a single value
    out = []
    for i, label in enumerate(("popo (full)", "drop siamese", "grpo (baseline)")):
        curve = [(s, s / 40 - 0.1 * i, 0.05 if seeds > 1 else 0.0) for s in (0, 20, 40)]
        out.append(VariantSummary(label, label, "", Stat(0.9 - 0.1 * i, std, seeds), Stat(0.8 - 0.1 * i, std, seeds),
                                  None, None, curve))
    return out


TITLE = "popo ablate tiny: 40 steps"


@pytest.mark.parametrize("seeds", [1, 3])
def test_ablation_bars_show_a_spread_only_with_seeds_to_spread(seeds):
    fig = plots.ablation_bars_figure(summaries(seeds), TITLE)
    title = texts(fig)
    assert "tiny" in title and "40 steps" in title and f"{seeds} seed" in title
    for ax in fig.axes:
        assert ax.get_xlabel() == "variant" and ax.get_ylabel().startswith("final ")
        assert [t.get_text() for t in ax.get_xticklabels()] == ["popo (full)", "drop siamese", "grpo (baseline)"]
        errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        whiskers = [c for c in ax.collections if isinstance(c, LineCollection)]
        assert (len(errorbars), len(whiskers)) == ((1, 1) if seeds > 1 else (0, 0))
    if seeds > 1:
        assert "mean ± std" in title
    else:
        assert "±" not in title and "std" not in title and "no spread" in title


@pytest.mark.parametrize("seeds", [1, 3])
def test_ablation_curves_draw_std_bands_only_with_seeds_to_spread(seeds):
    fig = plots.ablation_curves_figure(summaries(seeds), TITLE)
    ax = fig.axes[0]
    title = texts(fig)
    assert "tiny" in title and "40 steps" in title and f"{seeds} seed" in title
    assert ax.get_xlabel() == "step" and "eval/accuracy" in ax.get_ylabel()
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == (3 if seeds > 1 else 0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["popo (full)", "drop siamese", "grpo (baseline)"]
    assert ("mean ± std" in title) == (seeds > 1) and ("±" in title) == (seeds > 1)


def test_ablation_files_are_written(tmp_path):
    assert plots.ablation_bars(summaries(1), tmp_path / "a.png", TITLE).stat().st_size > 0
    assert plots.ablation_curves(summaries(3), tmp_path / "c.png", TITLE).stat().st_size > 0


# ------------------------------------------------------------------------------ sweep
PARAMS = ["algo.momentum", "algo.clip_eps", "algo.penalty"]


@pytest.fixture(scope="module")
def quick_importances():
    """fANOVA with 4 trees instead of 64: the same figure, drawn in a tenth of the time."""
    optuna = pytest.importorskip("optuna")
    from optuna.visualization import matplotlib as ovm

    draw = ovm.plot_param_importances
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=4, seed=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ovm, "plot_param_importances", lambda *a, **kw: draw(*a, **{**kw, "evaluator": evaluator}))
        yield


@pytest.fixture(scope="module")
def study(quick_importances):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="momentum-tiny", direction="maximize")
    dists = {"algo.momentum": FloatDistribution(0.9, 0.999), "algo.clip_eps": FloatDistribution(0.05, 0.5, log=True),
             "algo.penalty": CategoricalDistribution(["similarity", "kl"])}
    for i in range(9):
        params = {"algo.momentum": 0.9 + 0.011 * i, "algo.clip_eps": 0.05 * 1.3 ** i,
                  "algo.penalty": ("similarity", "kl")[i % 2]}
        # Trial 0 is the best: Optuna's "Blues" slice colormap draws it almost white.
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=1.0 - 0.05 * i))
    return study


@pytest.fixture(scope="module")
def figures(study):
    import matplotlib.pyplot as plt

    figs, notes = plots.sweep_figures(study, PARAMS, "eval/accuracy", preset="tiny", max_steps=40)
    for fig in figs.values():
        fig.canvas.draw()  # ticks and colormapped facecolors are settled at draw time
    yield figs, notes
    for fig in figs.values():
        plt.close(fig)


def luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_sweep_figures_are_titled_with_the_study_preset_and_budget(figures):
    figs, notes = figures
    assert set(figs) == {"history", "slice", "contour", "importances"} and notes == []
    for name, fig in figs.items():
        title = texts(fig)
        assert "momentum-tiny" in title and "preset tiny" in title and "40 steps per trial" in title, name
        assert "Plot" not in title and "Hyperparameter Importances" not in title, name  # Optuna's stock titles


def test_sweep_axes_name_the_parameters_and_the_metric(figures):
    figs, _ = figures
    history = figs["history"].axes[0]
    assert (history.get_xlabel(), history.get_ylabel()) == ("trial number", "eval/accuracy")
    panels = [ax for ax in figs["slice"].axes if ax.get_label() != "<colorbar>"]
    assert sorted(ax.get_xlabel() for ax in panels) == sorted(PARAMS)
    assert panels[0].get_ylabel() == "eval/accuracy"
    assert any(ax.get_ylabel() == "trial number" for ax in figs["slice"].axes)  # the colorbar
    contour = {ax.get_xlabel() for ax in figs["contour"].axes} | {ax.get_ylabel() for ax in figs["contour"].axes}
    assert set(PARAMS) <= contour and "eval/accuracy" in contour
    importances = figs["importances"].axes[0]
    assert "eval/accuracy" in importances.get_xlabel() and importances.get_ylabel() == "parameter"


def test_sweep_history_counts_trials_in_whole_numbers(quick_importances):
    import matplotlib.pyplot as plt
    import optuna
    from optuna.distributions import FloatDistribution

    few = optuna.create_study(study_name="few", direction="maximize")  # 3 trials: matplotlib would tick 0.25s
    for i in range(3):
        few.add_trial(optuna.trial.create_trial(params={"algo.momentum": 0.9 + 0.01 * i}, value=0.1 * i,
                                                distributions={"algo.momentum": FloatDistribution(0.9, 0.999)}))
    figs, _ = plots.sweep_figures(few, ["algo.momentum"], "eval/accuracy")
    ax = figs["history"].axes[0]
    figs["history"].canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    for fig in figs.values():
        plt.close(fig)
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_every_trial_marker_is_visible(figures):
    figs, _ = figures
    points = 0
    for name in ("history", "slice", "contour"):
        for ax in figs[name].axes:
            for dots in ax.collections:
                if not isinstance(dots, PathCollection) or not len(dots.get_offsets()):
                    continue
                faces = to_rgba_array(dots.get_facecolors())
                edges = to_rgba_array(dots.get_edgecolors())
                widths = dots.get_linewidths()
                for i, face in enumerate(faces):
                    points += 1
                    edge, width = edges[i % len(edges)], widths[i % len(widths)]
                    if luminance(face) > 0.85:
                        assert luminance(edge) < 0.35 and width > 0, (name, i, face, edge)
    assert points >= 9 * 3  # history, three slice panels, six contour panels: every trial somewhere


def test_sweep_plots_save_every_figure_and_leave_pyplot_as_it_was(study, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    facecolor, open_before = matplotlib.rcParams["axes.facecolor"], plt.get_fignums()
    paths, notes = plots.sweep_plots(study, tmp_path, PARAMS[:1], "eval/accuracy", preset="tiny", max_steps=40)
    assert [p.name for p in paths] == ["history.png", "slice.png"] and all(p.stat().st_size > 0 for p in paths)
    assert notes == ["importances skipped: one parameter (its importance is 1 by definition)"]
    assert plt.get_fignums() == open_before
    assert matplotlib.rcParams["axes.facecolor"] == facecolor  # Optuna's ggplot style stays in its figures


def test_a_failing_sweep_figure_is_a_note_and_the_others_are_kept(study, monkeypatch):
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    def broken(*args, **kwargs):
        plt.subplots()  # half drawn, then fails: its figure must be closed, the others kept
        raise ValueError("no contour today\nsecond line")

    open_before = set(plt.get_fignums())
    monkeypatch.setattr(ovm, "plot_contour", broken)
    figs, notes = plots.sweep_figures(study, PARAMS[:2], "eval/accuracy", preset="tiny", max_steps=40)
    try:
        assert "contour plot skipped: no contour today" in notes
        assert list(figs) == ["history", "slice", "importances"]
        assert set(plt.get_fignums()) - open_before == {fig.number for fig in figs.values()}
    finally:
        for fig in figs.values():
            plt.close(fig)


@pytest.mark.parametrize(("lim", "expected"), [
    ((2.8e-5, 2.1e-4), [5e-5, 1e-4, 2e-4]),  # under a decade: the study's learning rates
    ((1.2e-5, 3.5e-4), [2e-5, 5e-5, 1e-4, 2e-4]),  # one power of ten in range
    ((8e-4, 0.3), [1e-3, 1e-2, 1e-1]),  # over two decades: powers of ten only
    ((0.22, 0.28), [0.22, 0.23, 0.24, 0.25, 0.26, 0.27, 0.28]),  # none: matplotlib's plain ticks
])
def test_log_axes_get_log_spaced_plain_ticks_that_do_not_collide(lim, expected):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(*lim)
    plots._readable_log_ticks(fig)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if lim[0] <= t <= lim[1]]
    labels = {t.get_text() for t in ax.get_xticklabels() if lim[0] <= t.get_position()[0] <= lim[1]}
    plt.close(fig)
    assert ticks == pytest.approx(expected)
    assert labels == {f"{t:g}" for t in expected}
