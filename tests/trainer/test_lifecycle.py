"""A training run's life (popo_core/trainer/lifecycle.py): TrainingRun, directly.

Which output directories a run starts in, resumes or refuses (and the key it names), the steps a
resume redoes, the cadences, and what `open` does to metrics.jsonl on a resume. The checks on a
directory read only checkpoint/state.json, so most tests write that file alone; the resume test
uses a real run of the tiny preset killed after its step-2 checkpoint. (A resumed run equal to an
uninterrupted one: tests/trainer/test_loop.py.)
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import tiny_overrides
from popo_core.config import ConfigError, compose, to_flat_dict
from popo_core.trainer.lifecycle import RESUMABLE_CHANGES, Callbacks, TrainingRun
from popo_core.trainer.loop import build, train
from helpers import StopAt, tiny_config

SMALL = {"trainer.max_steps": 4, "trainer.save_every": 2, "trainer.eval_every": 0, "trainer.diagnostics_every": 0,
         "rollout.prompts_per_step": 4, "rollout.group_size": 2}


def config(tmp, **trainer):
    """The tiny preset with SMALL, writing to tmp/run, with `trainer` settings changed (composed once:
    a Hydra compose takes tenths of a second)."""
    base = tiny_config(*tiny_overrides(Path("unused"), **SMALL))
    return dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, output_dir=str(tmp / "run"), **trainer))


def write_checkpoint(out, cfg, step: int, **saved) -> None:
    """checkpoint/state.json of a run of `cfg` at `step`, with the settings in `saved` changed."""
    (out / "checkpoint").mkdir(parents=True)
    state = {"step": step, "run_id": None, "history": [], "counters": {}, "config": to_flat_dict(cfg) | saved}
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))


def write_metrics(out, steps) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n\n" for s in steps))


def logged_steps(out) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------ the output directory
def test_a_new_directory_starts_at_step_one(tmp_path):
    run = TrainingRun(config(tmp_path))
    assert run.output_dir == tmp_path / "run" and not run.output_dir.exists()  # nothing written yet
    assert not run.resuming and run.saved_step == 0 and list(run.redone) == []
    assert run.steps() == range(1, 5)


@pytest.mark.parametrize("leftover", ["notes.txt", "model.safetensors"])
def test_a_non_empty_directory_without_a_checkpoint_is_refused(tmp_path, leftover):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / leftover).write_text("x")
    with pytest.raises(ConfigError, match=re.escape(f"trainer.output_dir={tmp_path / 'run'}: not empty and holds no "
                                                    "checkpoint; pick another dir")):
        TrainingRun(config(tmp_path))


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path):
    """config.yaml and metrics.jsonl alone: the run starts again from step 1 and its old metrics go."""
    cfg = config(tmp_path)
    write_metrics(tmp_path / "run", [0, 1, 2])
    (tmp_path / "run" / "config.yaml").write_text("left_from_before: true\n")
    run = TrainingRun(cfg)
    assert not run.resuming and list(run.redone) == []
    learner, tokenizer, _ = build(cfg)
    with run.open(learner, tokenizer):
        assert logged_steps(tmp_path / "run") == []
        run.log(1, {"reward/mean": 0.5})
    assert logged_steps(tmp_path / "run") == [1]
    assert "left_from_before" not in (tmp_path / "run" / "config.yaml").read_text()


def test_a_run_killed_while_writing_its_first_checkpoint_starts_afresh(tmp_path):
    """A half-written checkpoint.tmp/ is no checkpoint and no foreign content: the run starts at 1."""
    (tmp_path / "run" / "checkpoint.tmp" / "policy").mkdir(parents=True)
    write_metrics(tmp_path / "run", [0, 1, 2])
    run = TrainingRun(config(tmp_path))
    assert not run.resuming and run.steps().start == 1


def test_a_directory_holding_a_run_needs_resume(tmp_path):
    cfg = config(tmp_path, resume=False)
    write_checkpoint(tmp_path / "run", cfg, 2)
    with pytest.raises(ConfigError, match=re.escape("holds a run; resume it (trainer.resume=true) or pick another dir")):
        TrainingRun(cfg)


@pytest.mark.parametrize("key, saved", [("algo.momentum", 0.5), ("optim.lr", 0.5), ("rollout.group_size", 3),
                                        ("trainer.seed", 7), ("trainer.micro_batch_size", 5),
                                        ("model.name_or_path", "other")])
def test_a_run_with_other_settings_is_refused_naming_the_key(tmp_path, key, saved):
    cfg = config(tmp_path)
    current = to_flat_dict(cfg)[key]
    assert saved != current
    write_checkpoint(tmp_path / "run", cfg, 2, **{key: saved})
    with pytest.raises(ConfigError, match=re.escape(f"holds a run with {key}={saved}, not {current}; pick another dir")):
        TrainingRun(cfg)


# A value differing from config()'s for every setting a resumed run may change, and for tracking.*.
CHANGEABLE = {"trainer.max_steps": 3, "trainer.eval_every": 99, "trainer.save_every": 99,
              "trainer.diagnostics_every": 99, "trainer.threads": 4, "trainer.device": "cuda:3", "trainer.resume": False,
              "trainer.output_dir": "/elsewhere/run", "tracking.experiment": "other", "tracking.enabled": True,
              "rollout.threads": 2}


def test_every_resumable_change_is_tried_below():
    assert set(RESUMABLE_CHANGES) <= set(CHANGEABLE)


@pytest.mark.parametrize("key", list(CHANGEABLE))
def test_budget_cadence_and_logging_may_change_on_resume(tmp_path, key):
    cfg = config(tmp_path)
    assert to_flat_dict(cfg)[key] != CHANGEABLE[key]
    write_checkpoint(tmp_path / "run", cfg, 2, **{key: CHANGEABLE[key]})
    run = TrainingRun(cfg)
    assert run.resuming and run.saved_step == 2


def test_max_steps_below_the_checkpoint_is_refused(tmp_path):
    write_checkpoint(tmp_path / "run", config(tmp_path), 5)
    with pytest.raises(ConfigError, match=re.escape(f"trainer.max_steps=4: trainer.output_dir={tmp_path / 'run'} holds "
                                                    "a run already at step 5; give trainer.max_steps>=5")):
        TrainingRun(config(tmp_path))
    assert TrainingRun(config(tmp_path, max_steps=5)).resuming  # equal: nothing left, but no error


@pytest.mark.parametrize("checkpoint_step, logged, max_steps, redone", [
    (2, range(0, 6), 8, [3, 4, 5]),  # killed at step 5: steps 3-5 are trained and logged again
    (2, range(0, 6), 4, [3, 4]),  # a smaller budget redoes only what it reaches
    (2, range(0, 3), 8, []),  # killed right after the checkpoint
    (2, None, 8, []),  # no metrics.jsonl
    (4, range(0, 6), 4, []),  # finished at the checkpoint
])
def test_redone_steps_come_from_metrics_jsonl(tmp_path, checkpoint_step, logged, max_steps, redone):
    cfg = config(tmp_path, max_steps=max_steps)
    write_checkpoint(tmp_path / "run", cfg, checkpoint_step)
    if logged is not None:
        write_metrics(tmp_path / "run", logged)
    assert list(TrainingRun(cfg).redone) == redone


def test_a_finished_run_returns_its_saved_result(tmp_path):
    cfg = config(tmp_path)
    write_checkpoint(tmp_path / "run", cfg, 4)
    saved = {"output_dir": str(tmp_path / "run"), "run_id": None, "step": 4, "final_accuracy": 0.5,
             "metrics": {"reward/mean": 0.25}, "history": [{"step": 4, "reward/mean": 0.25}]}
    (tmp_path / "run" / "result.json").write_text(json.dumps(saved))
    done = TrainingRun(cfg).finished_result()
    assert done is not None and done.resumed_complete and done.step == 4 and done.final_accuracy == 0.5
    assert done.metrics == saved["metrics"] and done.history == saved["history"]
    assert TrainingRun(config(tmp_path, max_steps=6)).finished_result() is None  # more to train


# ------------------------------------------------------------------------------------ cadences
@pytest.mark.parametrize("max_steps, eval_every, save_every", [(10, 3, 4), (10, 0, 10), (7, 1, 3), (6, 5, 1), (4, 50, 100)])
def test_eval_and_save_cadences(tmp_path, max_steps, eval_every, save_every):
    run = TrainingRun(config(tmp_path, max_steps=max_steps, eval_every=eval_every, save_every=save_every))
    evals = set(range(eval_every, max_steps + 1, eval_every)) if eval_every else set()
    saves = set(range(save_every, max_steps + 1, save_every))
    # Each every k steps, and both at the last step whatever k is (eval_every=0: only there).
    assert {s for s in run.steps() if run.eval_due(s)} == evals | {max_steps}
    assert {s for s in run.steps() if run.save_due(s)} == saves | {max_steps}


# --------------------------------------------------------------------------------- a real resume
class Recorder(Callbacks):
    def __init__(self):
        self.calls = []

    def on_start(self, start_step, total_steps, output_dir):
        self.calls.append(("start", start_step, total_steps, output_dir))

    def on_resume(self, step, redone, last):
        self.calls.append(("resume", step, redone, last))

    def on_step(self, step, metrics):
        self.calls.append(("step", step))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The tiny preset killed after logging step 4 of 4; its last checkpoint is step 2's."""
    tmp = tmp_path_factory.mktemp("killed")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(compose("tiny", tiny_overrides(tmp, **SMALL)), StopAt(4))
    assert logged_steps(tmp / "run") == [0, 1, 2, 3, 4]
    return tmp / "run"


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path, killed_run):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    before = (out / "metrics.jsonl").read_text().splitlines()
    cfg = config(tmp_path)
    callbacks = Recorder()
    run = TrainingRun(cfg, callbacks)
    assert run.resuming and run.saved_step == 2 and run.redone == range(3, 5)
    saved = json.loads((out / "checkpoint" / "state.json").read_text())
    learner, tokenizer, _ = build(cfg)
    with run.open(learner, tokenizer):
        # Steps 3 and 4 are trained again and logged once: their old lines are gone, the rest kept as they were.
        assert (out / "metrics.jsonl").read_text().splitlines() == before[:3]
        assert run.state["step"] == 2 and run.steps() == range(3, 5)
        assert dataclasses.asdict(learner.counters) == saved["counters"]
        last = {"reward/mean": saved["history"][2]["reward/mean"], "eval/accuracy": saved["history"][0]["eval/accuracy"]}
        assert callbacks.calls == [("start", 2, 4, out), ("resume", 2, range(3, 5), last)]
        run.log(3, {"reward/mean": 0.75, "loss/policy": 1.0})
    assert logged_steps(out) == [0, 1, 2, 3]
    assert run.state["history"][-1] == {"step": 3, "reward/mean": 0.75}  # only the summary keys
    assert callbacks.calls[-1] == ("step", 3)
