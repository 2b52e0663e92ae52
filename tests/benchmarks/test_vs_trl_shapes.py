"""benchmarks/vs_trl's shapes are valid popo runs, and its report's step intervals are the wall
clock between consecutive step lines (TRL itself is not needed for these)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "vs_trl"))

from report import per_run, timing  # noqa: E402
from shapes import SHAPES  # noqa: E402

from popo_core.config import compose  # noqa: E402


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("method", ["popo", "grpo"])
def test_every_shape_composes_into_the_setup_it_names(name, method):
    shape = SHAPES[name]
    cfg = compose(shape.preset, [f"algo={method}", *shape.popo_overrides()])
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (shape.prompts, shape.group_size)
    assert (cfg.algo.epochs, cfg.algo.mini_batches) == (shape.epochs, shape.mini_batches)
    assert cfg.rollout.max_new_tokens == shape.max_new_tokens and cfg.trainer.max_steps == shape.steps
    assert shape.completions_per_optimizer_step * shape.mini_batches == shape.prompts * shape.group_size


def test_step_intervals_and_start_up_come_from_the_stamped_lines():
    rows = [{"step": 0, "wall_s": 5.0, "eval/accuracy": 0.1}]
    for step, (wall, loop) in enumerate([(6.0, 0.5), (6.4, 0.3), (7.2, 0.6)], start=1):
        rows.append({"step": step, "wall_s": wall, "time/generate_s": loop / 2, "time/grade_s": 0.0,
                     "time/update_s": loop / 2, "time/step_s": loop, "positives/fraction": 1.0 if step == 3 else 0.5,
                     "train/forward_tokens": 10 * step})
    run = {"rows": rows, "wall_s": 8.0, "peak_rss_mb": 100.0}
    one = per_run(run, n_opt=2)
    assert [round(s["wall"], 6) for s in one["steps"]] == [1.0, 0.4, 0.8]
    assert [round(s["outside"], 6) for s in one["steps"]] == [0.5, 0.1, 0.2]  # interval minus the in-loop timer
    assert one["startup"] == pytest.approx(6.0 - 0.5)  # to the first step's start, the step-0 evaluation included
    t = timing([run], n_opt=2)
    assert t["wall"]["median"] == pytest.approx(0.8) and t["n_pos"] == 1
