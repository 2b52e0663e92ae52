"""trainer.eval_samples: the held-out sampled pass@1 logged as eval/pass_at_1 beside the greedy accuracy."""

import json
from types import SimpleNamespace

from conftest import tiny_overrides
from popo_core.config import compose
from popo_core.data.datasets import Problem
from popo_core.evaluation.metrics import pass_at_k
from popo_core.grading.verifiers import ExactMatch
from popo_core.rollout.sampling import prompt_keys


class FakeEngine:
    """Greedy: every answer wrong. Sampled: problem i (by its seed) has i % (n + 1) correct samples."""

    def __init__(self, problems, n):
        self.by_seed = dict(zip(prompt_keys(7, 0, 0, len(problems), stream=1), range(len(problems))))
        self.problems, self.n, self.calls = problems, n, []

    def generate(self, prompt_ids, *, n, temperature, top_p, max_new_tokens, greedy, seeds=None):
        self.calls.append({"prompts": len(prompt_ids), "n": n, "greedy": greedy, "temperature": temperature})
        if greedy:
            return SimpleNamespace(texts=["x"] * len(prompt_ids) * n)
        texts = []
        for s in seeds:
            i = self.by_seed[s]
            texts += [self.problems[i].answer if j < i % (n + 1) else "x" for j in range(n)]
        return SimpleNamespace(texts=texts)


class Tokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return SimpleNamespace(input_ids=[[1] for _ in texts])


def test_eval_samples_adds_the_sampled_pass_at_1_at_the_rollout_temperature():
    from popo_core.trainer.loop import evaluate

    n = 4
    problems = [Problem(str(i), f"{i}=", str(i)) for i in range(70)]  # several sampled batches (256 // 4 = 64)
    learner = SimpleNamespace(autocast=lambda: __import__("contextlib").nullcontext())
    cfg = compose("tiny", ["trainer.seed=7", f"trainer.eval_samples={n}", "rollout.temperature=0.7"])
    engine = FakeEngine(problems, n)
    out = evaluate(engine, Tokenizer(), problems, ExactMatch(), cfg, learner)
    expected = sum(pass_at_k(n, i % (n + 1), 1) for i in range(len(problems))) / len(problems)  # independent
    assert out == {"eval/accuracy": 0.0, "eval/pass_at_1": expected} and 0 < expected < 1
    sampled = [c for c in engine.calls if not c["greedy"]]
    assert {c["n"] for c in sampled} == {n} and {c["temperature"] for c in sampled} == {0.7}
    assert sum(c["prompts"] for c in sampled) == len(problems) and len(sampled) == 2

    for off in ("null", "0"):  # today's greedy check alone
        engine = FakeEngine(problems, n)
        cfg = compose("tiny", ["trainer.seed=7", f"trainer.eval_samples={off}"])
        assert set(evaluate(engine, Tokenizer(), problems, ExactMatch(), cfg, learner)) == {"eval/accuracy"}
        assert all(c["greedy"] for c in engine.calls)


def test_a_run_logs_eval_pass_at_1_at_each_evaluation(workdir):
    from popo_core.trainer.loop import train

    cfg = compose("tiny", tiny_overrides(workdir, **{"trainer.max_steps": 2, "trainer.eval_every": 1,
                                                     "trainer.eval_samples": 3}))
    result = train(cfg)
    logged = [json.loads(ln) for ln in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/pass_at_1" in r] == [0, 1, 2]
    assert all(0.0 <= r["eval/pass_at_1"] <= 1.0 for r in logged if "eval/pass_at_1" in r)
    assert "eval/pass_at_1" in result.metrics
