"""The real vLLM engine on the real pretrained model (SmolLM2-135M-Instruct): `make test-vllm` after
`make setup-smol-vllm` runs these (CI does, where neither may skip).

vLLM on CPU meets here what the tiny model never showed it: a 49k BPE vocabulary, an 8k context
whose KV cache does not fit the default CPU cache (the engine caps it), and seeded sampling of a
group (n = G) from one request."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_popo
from helpers import SMOL_SHORT

pytestmark = [pytest.mark.smol, pytest.mark.vllm, pytest.mark.slow]

SHORT = SMOL_SHORT


@pytest.fixture(scope="module")
def smol_engines():
    from popo_core.evaluation.runner import resolve_model
    from popo_core.model.loading import load_model_and_tokenizer
    from popo_core.rollout import make_engine
    from popo_core.rollout.hf import HFEngine

    model, tok = load_model_and_tokenizer(resolve_model("smol"), device=torch.device("cpu"))
    model.eval()
    return model, tok, HFEngine(model, tok), make_engine("vllm", model, tok, seed=0)


def gsm8k_prompts(tok, n: int) -> list[list[int]]:
    from popo_core.data.datasets import load_problems, prompt_ids

    return prompt_ids(tok, "chat", load_problems("gsm8k", split="test", limit=n))


def test_greedy_answers_agree_with_the_hf_engine(smol_engines):
    _, tok, hf, vllm = smol_engines
    prompts = gsm8k_prompts(tok, 4)
    a = hf.generate(prompts, greedy=True, max_new_tokens=48).completion_ids
    b = vllm.generate(prompts, greedy=True, max_new_tokens=48).completion_ids
    # fp32 on both sides; a near-tie may still flip a token late in a completion.
    same = sum(x[:24] == y[:24] for x, y in zip(a, b))
    assert same >= 3, (a, b)


def test_a_seeded_group_from_one_request_is_reproducible_and_distinct_per_sample(smol_engines):
    model, tok, _, vllm = smol_engines
    from popo_core.trainer.logprobs import collate, completion_forward

    prompts = gsm8k_prompts(tok, 2)
    first = vllm.generate(prompts, n=4, max_new_tokens=16, seeds=[3, 4], temperature=1.0)
    again = vllm.generate(prompts, n=4, max_new_tokens=16, seeds=[3, 4], temperature=1.0)
    assert first.completion_ids == again.completion_ids
    assert len({tuple(c) for c in first.completion_ids[:4]}) > 1  # the group's samples differ
    other = vllm.generate(prompts, n=4, max_new_tokens=16, seeds=[5, 4], temperature=1.0)
    assert other.completion_ids[:4] != first.completion_ids[:4] and other.completion_ids[4:] == first.completion_ids[4:]
    # The sampler's log-probs are those the trainer recomputes (fp32, 49k vocabulary).
    seqs = collate(first.prompt_ids, first.completion_ids, vllm.pad_id, "cpu")
    with torch.no_grad():
        lp, _ = completion_forward(model, seqs, temperature=1.0, suppress_ids=vllm.suppress)
    gap = max(abs(float(lp[i, j]) - first.logprobs[i][j]) for i in range(len(first))
              for j in range(len(first.completion_ids[i])))
    assert gap < 1e-3


def test_popo_train_smol_with_vllm_then_eval_with_vllm(workdir):
    proc = run_popo("train", "smol", "rollout.engine=vllm", f"trainer.output_dir={workdir / 'run'}", *SHORT, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(abs(r["rollout/logprob_mismatch"]) < 1e-3 for r in rows[1:])
    proc = run_popo("eval", "--bench", "gsm8k", "--model", "smol", "--engine", "vllm", "--limit", "2",
                    "--max-new-tokens", "16", "--threads", "1", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
