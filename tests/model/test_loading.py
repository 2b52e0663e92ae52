import string

import pytest
import torch

from popo_core.config import ModelConfig
from popo_core.model.loading import build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer, load_tokenizer, save_policy
from popo_core.trainer.logprobs import collate, completion_forward
from popo_core.rollout import cut_at_eos
from popo_core.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"))


def test_tokenizer_round_trips_printable_ascii():
    tok = build_tiny_tokenizer()
    text = string.printable[:95] + "\n\t\\boxed{3/4}"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_saved_tokenizer_is_not_swapped_for_qwen2s(tiny, tmp_path):
    model, tok = tiny
    save_policy(model, tok, tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    text = "12+7=9 \\boxed{x}"
    assert reloaded(text).input_ids == tok(text).input_ids
    assert len(reloaded) == len(tok)


def test_tiny_model_has_vllm_compatible_head_size(tiny):
    cfg = tiny[0].config
    assert cfg.model_type == "qwen2" and cfg.hidden_size // cfg.num_attention_heads >= 32
    with pytest.raises(ValueError):
        build_tiny_model(build_tiny_tokenizer(), hidden_size=64, num_heads=4)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7], {2}) == ([5, 6, 2], False)
    assert cut_at_eos([5, 6, 7], {2}) == ([5, 6, 7], True)


def test_completion_forward_matches_full_forward(tiny):
    model, tok = tiny
    prompts = [tok("3+5=").input_ids, tok("12+1=").input_ids]
    comps = [[10, 11, 2], [12]]
    seqs = collate(prompts, comps, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp, h = completion_forward(model, seqs, temperature=0.7, suppress_ids=[0, 1], hidden=True)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            ids = torch.tensor([p + c])
            logits = model(ids).logits[0] / 0.7
            logits[:, [0, 1]] = float("-inf")
            ref = logits.log_softmax(-1)[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)]
            torch.testing.assert_close(lp[i, : len(c)], ref, rtol=1e-5, atol=1e-5)
            assert torch.all(lp[i, len(c) :] == 0)
            hidden = model.model(ids).last_hidden_state[0, len(p) - 1 : len(p) + len(c) - 1]
            torch.testing.assert_close(h[i, : len(c)], hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_hf_rollouts_record_the_sampling_distributions_logprobs(tiny, temperature):
    model, tok = tiny
    engine = HFEngine(model, tok)
    torch.manual_seed(1)
    prompts = [tok("1+2=").input_ids, tok("9+9=").input_ids]
    out = engine.generate(prompts, n=3, temperature=temperature, max_new_tokens=6)
    assert len(out) == 6 and out.group_ids == [0, 0, 0, 1, 1, 1]
    seqs = collate(out.prompt_ids, out.completion_ids, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp, _ = completion_forward(model, seqs, temperature=temperature, suppress_ids=engine.suppress)
    for i, sampler in enumerate(out.logprobs):
        assert len(sampler) == len(out.completion_ids[i])
        torch.testing.assert_close(lp[i, : len(sampler)], torch.tensor(sampler), rtol=1e-4, atol=1e-4)
        # Stop at EOS: an EOS, if present, is the last token; suppressed specials never appear.
        comp = out.completion_ids[i]
        assert tok.eos_token_id not in comp[:-1]
        assert not set(comp) & set(engine.suppress)
        assert out.truncated[i] == (comp[-1] != tok.eos_token_id)


def test_greedy_is_deterministic(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    prompts = [tok("4+4=").input_ids]
    a = engine.generate(prompts, greedy=True, max_new_tokens=4)
    b = engine.generate(prompts, greedy=True, max_new_tokens=4)
    assert a.completion_ids == b.completion_ids


@pytest.mark.parametrize("max_new_tokens,greedy", [(1, False), (6, False), (6, True)])
def test_shared_prefill_samples_what_a_separate_prefill_samples(tiny, max_new_tokens, greedy):
    """Each distinct prompt's KV cache is computed once and copied to its n rows: the samples and
    their log-probs are those of prefilling every row (prompts of several lengths: left padding)."""
    model, tok = tiny
    prompts = [tok(t).input_ids for t in ["1+2=", "33+4=", "5=", "9+9+9="]]
    kwargs = dict(n=5, max_new_tokens=max_new_tokens, greedy=greedy, seeds=[11, 12, 13, 14])
    shared = HFEngine(model, tok).generate(prompts, **kwargs)
    separate = HFEngine(model, tok, shared_prefill=False).generate(prompts, **kwargs)
    assert shared.completion_ids == separate.completion_ids and shared.texts == separate.texts
    for a, b in zip(shared.logprobs, separate.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    if not greedy:
        assert len({tuple(c) for c in shared.completion_ids}) > 4  # the rows of a prompt did not all copy one


def test_shared_prefill_through_a_peft_model():
    from popo_core.config import compose
    from popo_core.model.lora import add_lora

    torch.manual_seed(0)
    cfg = compose("tiny", ["model.lora.rank=8"])
    model, tok = load_model_and_tokenizer(cfg.model, device=torch.device("cpu"))
    model = add_lora(model, cfg.model.lora)
    with torch.no_grad():  # a live adapter: lora_B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    prompts = [tok(t).input_ids for t in ["1+2=", "33+4=", "5="]]
    shared = HFEngine(model, tok).generate(prompts, n=4, max_new_tokens=5, seeds=[1, 2, 3])
    separate = HFEngine(model, tok, shared_prefill=False).generate(prompts, n=4, max_new_tokens=5, seeds=[1, 2, 3])
    assert shared.completion_ids == separate.completion_ids
    for a, b in zip(shared.logprobs, separate.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
