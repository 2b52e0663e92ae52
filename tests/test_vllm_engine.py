"""The vLLM engine's own logic, against a stand-in `vllm` module (vLLM itself needs a GPU here:
the CPU build pins transformers < 5.20, which this project's transformers 5.x excludes)."""

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from popo_core.config import ModelConfig
from popo_core.errors import ConfigError
from popo_core.models import load_model_and_tokenizer


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    token_ids: list
    finish_reason: str
    logprobs: list


class _FakeLLM:
    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _FakeLLM.calls.append(("init", kwargs))

    def collective_rpc(self, method, kwargs):
        _FakeLLM.calls.append((method, len(list(kwargs["weights_iterator"]))))

    def reset_prefix_cache(self):
        _FakeLLM.calls.append(("reset_prefix_cache", None))

    def generate(self, prompts, params, use_tqdm=False):
        _FakeLLM.calls.append(("generate", params))
        eos = params.stop_token_ids[0]
        outs = []
        for i, _ in enumerate(prompts):
            done = _Completion([10 + i, 11, eos], "stop", [{10 + i: _Logprob(-0.5)}, {11: _Logprob(-1.0)}, {eos: _Logprob(-0.1)}])
            cut = _Completion([12] * params.max_tokens, "length", [{12: _Logprob(-2.0)}] * params.max_tokens)
            outs.append(types.SimpleNamespace(outputs=[done, cut][: params.n]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    module.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", module)
    _FakeLLM.calls = []
    return module


def test_vllm_engine_converts_outputs_and_syncs_weights(fake_vllm):
    from popo_core.rollout import make_engine

    model, tok = load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"))
    engine = make_engine("vllm", model, tok, seed=3)
    init = _FakeLLM.calls[0][1]
    assert init["logprobs_mode"] == "processed_logprobs" and init["seed"] == 3 and init["enable_prefix_caching"]
    # Weights are pushed in memory and the prefix cache is dropped with them.
    assert [c[0] for c in _FakeLLM.calls[1:]] == ["reload_weights", "reset_prefix_cache"]
    out = engine.generate([[5, 6], [7]], n=2, temperature=0.8, max_new_tokens=3)
    params = _FakeLLM.calls[-1][1]
    assert params.temperature == 0.8 and params.top_k == -1 and params.logprobs == 0
    assert set(params.logit_bias) == set(engine.suppress) and tok.eos_token_id not in params.logit_bias
    assert out.group_ids == [0, 0, 1, 1]
    assert out.completion_ids[0] == [10, 11, tok.eos_token_id] and not out.truncated[0]
    assert out.completion_ids[1] == [12, 12, 12] and out.truncated[1]
    assert out.logprobs[0] == [-0.5, -1.0, -0.1] and out.logprobs[1] == [-2.0] * 3
    assert out.prompt_ids[2] == [7]
    greedy = engine.generate([[5]], greedy=True, max_new_tokens=3)
    assert _FakeLLM.calls[-1][1].temperature == 0.0 and len(greedy) == 1


def test_missing_vllm_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    from popo_core.rollout import make_engine

    model, tok = load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="rollout.engine=vllm"):
        make_engine("vllm", model, tok)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real vLLM rollouts need a CUDA GPU and `pip install popo[vllm]`")
def test_real_vllm_logprobs_match_the_trainer():  # pragma: no cover - GPU only
    pytest.importorskip("vllm")
    from popo_core.policy import collate, completion_forward
    from popo_core.rollout.vllm import VLLMEngine

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="Qwen/Qwen2.5-Math-1.5B", dtype="bfloat16"))
    engine = VLLMEngine(model, tok)
    out = engine.generate([tok("1+1=").input_ids], n=4, max_new_tokens=16)
    seqs = collate(out.prompt_ids, out.completion_ids, engine.pad_id, model.device)
    with torch.no_grad():
        lp, _ = completion_forward(model, seqs)
    for i, sampler in enumerate(out.logprobs):
        assert torch.allclose(lp[i, : len(sampler)].cpu(), torch.tensor(sampler), atol=0.1)
