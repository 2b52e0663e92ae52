"""The task registry and the arith task: traces, splits, the final-answer verifier, validation."""

import random
from collections import Counter
from dataclasses import replace
from itertools import islice

import pytest

from popo_core.data import tasks
from popo_core.config import ConfigError, DataConfig, compose
from popo_core.data.datasets import tiny_split
from popo_core.grading.verifiers import ExactMatch, FinalAnswer
from popo_core.data.tasks import make_verifier


def arith(**kw) -> DataConfig:
    base = dict(task="arith", seed=0, min_terms=2, max_terms=6, max_operand=9, train_size=500, eval_size=50)
    return DataConfig(**(base | kw))


def test_trace_writes_every_partial_sum_and_ends_with_the_answer():
    assert tasks.arith_trace("3+7+5=") == "3+7=10,10+5=15"
    assert tasks.arith_trace("3+4=") == "3+4=7"
    assert tasks.arith_trace("9=") == "9=9"
    rng = random.Random(1)
    for _ in range(200):
        terms = [rng.randint(0, 99) for _ in range(rng.randint(2, 7))]
        p = tasks.arith_problem(terms)
        trace = tasks.arith_trace(p.problem)
        steps = trace.split(",")
        assert len(steps) == len(terms) - 1
        running = terms[0]
        for step, term in zip(steps, terms[1:]):  # an independent re-derivation of each step
            assert step == f"{running}+{term}={running + term}"
            running += term
        assert p.answer == str(sum(terms)) == trace.rpartition("=")[2]


def test_split_is_disjoint_fixed_by_data_seed_and_sized():
    d = arith()
    train, held = tasks.arith_split(d)
    assert len(train) == 500 and len(held) == 50
    assert len({p.problem for p in train}) == 500 and len({p.problem for p in held}) == 50
    assert not {p.problem for p in train} & {p.problem for p in held}
    assert tasks.arith_split(d) == (train, held)  # deterministic
    other_train, other_held = tasks.arith_split(replace(d, seed=1))
    assert {p.problem for p in other_held} != {p.problem for p in held}
    # The held-out set does not move when the training set grows.
    assert tasks.arith_split(replace(d, train_size=900))[1] == held
    for p in train + held:
        terms = [int(t) for t in p.problem.rstrip("=").split("+")]
        assert 2 <= len(terms) <= 6 and all(0 <= t <= 9 for t in terms) and p.answer == str(sum(terms))


def test_split_ignores_trainer_seed():
    a = tasks.load_task(compose("arith", ["trainer.seed=0"]))
    b = tasks.load_task(compose("arith", ["trainer.seed=5"]))
    c = tasks.load_task(compose("arith", ["data.seed=5", "model.name_or_path=warmstart"]))  # the shipped one: data.seed=0
    assert a == b and a[1] != c[1]


def test_pools_split_every_length_in_their_shares():
    count = Counter()
    for a in range(10):
        for b in range(10):
            for c in range(10):
                for e in range(10):
                    count[tasks.arith_pool(f"{a}+{b}+{c}+{e}=", 0)] += 1
    assert abs(count["held_out"] - 1000) < 100 and abs(count["train"] - 4000) < 200 and abs(count["sft"] - 5000) < 200
    two = Counter(tasks.arith_pool(f"{a}+{b}=", 0) for a in range(10) for b in range(10))
    assert set(two) == {"held_out", "train", "sft"}
    assert [tasks.arith_pool("3+4=", s) for s in range(20)] != [tasks.arith_pool("3+4=", 0)] * 20  # seed moves it


def test_sets_come_from_their_pools_and_sizes_do_not_interact():
    d = arith(train_size=3000, eval_size=200)
    train, held = tasks.arith_split(d)
    assert all(tasks.arith_pool(p.problem, 0) == "train" for p in train)
    assert all(tasks.arith_pool(p.problem, 0) == "held_out" for p in held)
    assert tasks.arith_split(replace(d, eval_size=100))[0] == train
    assert tasks.arith_split(replace(d, train_size=100))[1] == held
    lengths = Counter(p.problem.count("+") + 1 for p in held)
    assert lengths[2] <= 12 and set(lengths) == {2, 3, 4, 5, 6}


def test_tiny_task_is_unchanged():
    cfg = compose("tiny")
    assert tasks.load_task(cfg) == tiny_split(10, 2, seed=0)
    assert tasks.load_task(cfg)[0] == tasks.load_task(cfg)[1]  # 100 prompts: evaluated whole


def test_final_answer_grades_only_the_text_after_the_last_equals():
    v = FinalAnswer()
    responses = ["3+7=10,10+5=15", "3+7=10,10+5=16", "15", " 3+7=10,10+5= 15 ", "3+7=10,10+5=", "3+7=10,10+5=15,",
                 "3+7=10,10+5=151", "", "3+7=10,10+6=15"]
    grades = v(responses, ["15"] * len(responses))
    assert [g.correct for g in grades] == [True, False, True, True, False, False, False, False, True]
    assert [g.status for g in grades][4] == "unparsed" and grades[7].status == "unparsed"
    assert grades[0].extracted == "15"
    # The tiny task's verifier would take the whole completion.
    assert not ExactMatch()(["3+7=10,10+5=15"], ["15"])[0].correct
    assert isinstance(make_verifier("arith"), FinalAnswer)


def test_registry_names_are_the_config_choices():
    assert set(tasks.TASKS) == {"tiny", "math", "arith", "sums"}
    assert set(tasks.SYNTHETIC) <= set(tasks.TASKS) and set(tasks.SFT_EXAMPLES) <= set(tasks.TASKS)
    assert set(tasks.ARITH_LIKE) <= set(tasks.TASKS)


def test_sums_are_the_arith_split_asked_in_words_and_graded_by_math_verify():
    from popo_core.config import DataConfig
    from popo_core.grading.math_grader import MathVerifier

    d = DataConfig(task="sums", min_terms=2, max_terms=3, max_operand=49, train_size=300, eval_size=60, seed=3)
    train, held = tasks.sums_split(d)
    a_train, a_held = tasks.arith_split(DataConfig(**{**d.__dict__, "task": "arith"}))
    assert [p.answer for p in train] == [p.answer for p in a_train] and len(held) == 60
    for s, a in zip(train + held, a_train + a_held):
        assert s.problem == "What is " + a.problem.rstrip("=").replace("+", " + ") + "?"
        assert sum(int(t) for t in a.problem.rstrip("=").split("+")) == int(s.answer)
    assert not {p.problem for p in train} & {p.problem for p in held}  # disjoint by construction
    assert isinstance(tasks.make_verifier("sums"), MathVerifier)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.min_terms=0", "data.min_terms"),
        ("data.max_terms=1", "data.max_terms"),
        ("data.train_size=0", "data.train_size"),
        ("data.train_size=10000000", "data.train_size"),
        ("data.eval_size=1000000", "data.eval_size"),
        ("data.max_operand=-1", "data.max_operand"),
        ("data.task=foo", "data.task"),
        ("warmstart.steps=0", "warmstart.steps"),
        ("warmstart.lr=0", "warmstart.lr"),
        ("model.num_heads=8", "model.num_heads"),
        ("data=tiny", "model.name_or_path"),
    ],
)
def test_bad_arith_settings_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:  # the recipe: the shipped warm start refuses any other settings first
        compose("arith", ["model.name_or_path=warmstart", override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_small_space_is_refused_not_hung():
    with pytest.raises(ConfigError, match="data.train_size"):
        compose("arith", ["data.max_terms=2", "data.eval_size=5", "data.train_size=100"])


def test_the_held_out_normaliser_comes_from_the_task_registry():
    from popo_core.config import compose
    from popo_core.data.tasks import eval_normalizer
    from popo_core.evaluation.suite import BENCHMARKS

    assert eval_normalizer(compose("tiny").data) is None
    gsm = compose("tiny", ["data=math", "data.eval_path=gsm8k"]).data
    assert eval_normalizer(gsm) == BENCHMARKS["gsm8k"].normalize
    from types import SimpleNamespace

    assert eval_normalizer(SimpleNamespace(task="math", eval_path="some/file.jsonl")) is None
    assert eval_normalizer(SimpleNamespace(task="arith", eval_path="gsm8k")) is None
