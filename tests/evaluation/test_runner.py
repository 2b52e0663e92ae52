"""How `popo eval` resolves --model and checks its settings (no model is loaded here)."""

import pytest

from popo_core.errors import ConfigError, ModelLoadError, UserError
from popo_core.evaluation.runner import EvalSettings, list_ids, make_protocol, resolve_model, validate


def test_model_presets_carry_their_template():
    cfg = resolve_model("qwen-math-7b")
    assert (cfg.name_or_path, cfg.template, cfg.dtype) == ("Qwen/Qwen2.5-Math-7B", "qwen-math", "bfloat16")
    assert resolve_model("tiny").name_or_path == "tiny"
    assert resolve_model("qwen-math-1.5b", "plain").template == "plain"  # --template overrides


def test_checkpoint_directory_takes_the_runs_template(tmp_path):
    run = tmp_path / "run"
    policy = run / "checkpoint" / "policy"
    policy.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (policy / "config.json").write_text("{}")
    (run / "config.yaml").write_text("model:\n  template: qwen-math\n  dtype: float32\n")
    assert resolve_model(str(run)).template == "qwen-math"
    assert resolve_model(str(policy)).template == "qwen-math"  # two levels up
    (run / "config.yaml").unlink()
    assert resolve_model(str(policy)).template == "plain"


def test_hub_ids_and_bad_paths():
    cfg = resolve_model("Qwen/Qwen2.5-Math-1.5B-Instruct")
    assert (cfg.name_or_path, cfg.template) == ("Qwen/Qwen2.5-Math-1.5B-Instruct", "plain")
    with pytest.raises(ModelLoadError, match="not a model preset"):
        resolve_model("./missing/checkpoint")


def test_settings_checks():
    validate(EvalSettings(["aime24"], model="tiny"))
    several = EvalSettings(["aime24"], model="tiny", samples=4)
    validate(several)
    assert several.temperature == 1.0 and not several.greedy  # K > 1 samples at 1.0 by default
    one = EvalSettings(["aime24"], model="tiny")
    validate(one)
    assert one.greedy
    validate(EvalSettings(["aime24"], responses="r.jsonl", samples=1))
    validate(EvalSettings(["aime24"], responses="r.jsonl", answered_only=True))
    bad = [
        dict(model="tiny", responses="r.jsonl"),
        dict(model="tiny", samples=0),
        dict(model="tiny", samples=2, temperature=0.0),  # greedy K > 1 repeats one response
        dict(model="tiny", temperature=-1.0),
        dict(model="tiny", top_p=0.0),
        dict(model="tiny", eval_max_new_tokens=0),
        dict(model="tiny", timeout=0),
        dict(model="tiny", workers=-1),
        dict(model="tiny", engine="tgi"),
        dict(model="tiny", run_id="abc", tracking=False),
        dict(model="tiny", answered_only=True),  # a model answers every problem
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            validate(EvalSettings(["aime24"], **kwargs))


def test_protocol_lines_name_every_setting():
    s = EvalSettings(["aime24"], model="qwen-math-7b", samples=8, temperature=0.6, top_p=0.95, eval_max_new_tokens=2048)
    text = "\n".join(make_protocol(s, "math-verify 0.9.0, 5 s per answer", "qwen-math").lines())
    for part in ("qwen-math", "temperature 0.6", "top_p 0.95", "8 samples", "max_new_tokens 2048", "\\boxed{}", "math-verify"):
        assert part in text
    greedy = make_protocol(EvalSettings(["aime24"], model="tiny"), "g", "plain")
    assert "greedy" in greedy.sampling
    responses = make_protocol(EvalSettings(["aime24"], responses="r.jsonl"), "g", None)
    assert "responses file" in "\n".join(responses.lines())
    # how unanswered problems count is part of the protocol, in the notes and in summary.json
    assert responses.answered_only is False and "without a response is graded wrong" in responses.lines()[-1]
    only = make_protocol(EvalSettings(["aime24"], responses="r.jsonl", answered_only=True), "g", None)
    assert only.to_json()["answered_only"] is True and "--answered-only" in only.lines()[-1]
    assert greedy.answered_only is None and not any(line.startswith("scoring") for line in greedy.lines())


def test_list_ids_reads_the_benchmark_only(tmp_path):
    every = list_ids(EvalSettings(["aime25"]))
    assert [bench for bench, _ in every] == ["aime25"] * 30 and every[0][1].id == "2025-I-1"
    assert [p.id for _, p in list_ids(EvalSettings(["aime25", "amc23"], limit=2))] == ["2025-I-1", "2025-I-2", "0", "1"]
    data = tmp_path / "mine.jsonl"
    data.write_text('{"id": "q7", "problem": "1+1?", "answer": "2"}\n')
    assert [(b, p.id) for b, p in list_ids(EvalSettings(["aime24"], data=str(data)))] == [("aime24", "q7")]
    for settings, message in [(EvalSettings(["arith"]), "synthetic task"), (EvalSettings(["aime2"]), "unknown benchmark"),
                              (EvalSettings(["aime24"], limit=0), "--limit 0"),
                              (EvalSettings(["all"], data=str(data)), "single --bench")]:
        with pytest.raises(UserError, match=message):
            list_ids(settings)
