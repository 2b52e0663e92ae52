"""The memory/FLOPs plan (popo_core/trainer/sizing.py) against real models and the hand calculation.

What is measured here, on CPU: parameter counts (exact, against transformers' Qwen2 built on the
meta device at the presets' real sizes), bytes of weights, gradients, AdamW state and a momentum
copy of the real tiny model, and the bytes of every tensor autograd saves for backward (exact,
through saved-tensor hooks, deduplicated by storage, with and without gradient checkpointing, in
fp32 and bf16, with grouped-query attention). Not measured here: transient peaks (the LM head's
gradient buffers, allocator slack, vLLM), which need a GPU's peak-memory counter.
"""

from __future__ import annotations

import copy
import inspect
import re
import tempfile
from pathlib import Path

import pytest
import torch

from popo_core.trainer import sizing as P
from popo_core.config import ConfigError, compose
from popo_core.model.loading import build_tiny_model, build_tiny_tokenizer
from popo_core.trainer.logprobs import collate, completion_forward

from conftest import assert_one_line_error, run_popo
from helpers import saved_bytes


_DATA: list[str] = []


def preset_cfg(name: str, overrides=()):
    """compose() of a math preset with a stand-in data file, so these tests do not need ../shared."""
    if not _DATA:
        path = Path(tempfile.mkdtemp(prefix="popo-plan-")) / "train.jsonl"
        path.write_text('{"problem": "1+1?", "answer": "2"}\n')
        _DATA.append(str(path))
    return compose(name, [f"data.path={_DATA[0]}", f"data.eval_path={_DATA[0]}", *overrides])


def qwen2(arch: P.Arch, device="cpu"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                         num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                         num_key_value_heads=arch.kv_heads, tie_word_embeddings=arch.tied)
    with torch.device(device):
        return Qwen2ForCausalLM(config)


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once


# --- parameter counts ------------------------------------------------------------------------

@pytest.mark.parametrize("hidden, layers, heads, tied", [(64, 2, 2, True), (64, 1, 2, False), (128, 3, 4, True)])
def test_tiny_parameter_count_is_exact(hidden, layers, heads, tied):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=hidden, num_layers=layers, num_heads=heads, tie_embeddings=tied)
    cfg = compose("tiny", [f"model.hidden_size={hidden}", f"model.num_layers={layers}", f"model.num_heads={heads}",
                           f"model.tie_embeddings={str(tied).lower()}"])
    assert P.arch_of(cfg).params() == numel(model)


def test_tiny_mirrors_match_the_builder_and_the_hf_engine():
    from popo_core.rollout.hf import HFEngine

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=64)
    assert P.TINY_VOCAB_SIZE == len(tok) == model.config.vocab_size
    assert model.config.intermediate_size == P.TINY_INTERMEDIATE_FACTOR * 64
    assert model.config.num_key_value_heads == model.config.num_attention_heads
    assert P.HF_GENERATE_BATCH == inspect.signature(HFEngine).parameters["batch_size"].default


@pytest.mark.parametrize("preset, expected", [("qwen-math-7b", 7_615_616_512), ("qwen-math-1.5b", 1_543_714_304)])
def test_preset_parameter_counts_match_the_real_architecture(preset, expected):
    arch = P.arch_of(preset_cfg(preset))
    # The hand calculation of docs/scaling.md, and Qwen2 itself at full size on the meta device.
    assert arch.params() == expected == numel(qwen2(arch, device="meta"))


def test_7b_is_7_62_billion_within_one_percent():
    n = P.plan(preset_cfg("qwen-math-7b")).params
    assert abs(n - 7.62e9) / 7.62e9 < 0.01


def test_gqa_and_untied_count_is_exact():
    arch = P.Arch(hidden=128, intermediate=320, layers=2, heads=4, kv_heads=1, vocab=101, tied=False)
    assert arch.params() == numel(qwen2(arch))


def test_lora_count_matches_module_shapes_and_peft():
    arch = P.Arch(hidden=128, intermediate=320, layers=2, heads=4, kv_heads=2, vocab=101, tied=True)
    model = qwen2(arch)
    targets = ["q_proj", "v_proj", "down_proj"]
    by_shapes = sum(8 * (m.in_features + m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    assert arch.lora_params(8, targets) == by_shapes
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert arch.lora_params(8, targets) == trainable


# --- memory of model state, measured on the real tiny model -----------------------------------

def _tiny(dtype=torch.float32):
    tok = build_tiny_tokenizer()
    return build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=2).to(dtype), tok


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_tiny_model_state_bytes_match_the_plan():
    torch.manual_seed(0)
    model, tok = _tiny()
    cfg = compose("tiny", ["trainer.device=cpu"])
    plan = P.plan(cfg)
    mem = plan.memory
    assert mem["weights"] == _nbytes(model.parameters())
    assert mem["master weights (fp32)"] == 0  # fp32 weights are their own masters
    momentum = copy.deepcopy(model)  # the trainer's frozen_copy: a full second model
    assert mem["momentum network (fp32)"] == _nbytes(momentum.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seqs = collate([[5, 6, 7, 8]] * 3, [[9, 10]] * 3, tok.pad_token_id, "cpu")
    lp, _ = completion_forward(model, seqs)
    lp.sum().backward()
    assert mem["gradients (fp32)"] == _nbytes(p.grad for p in model.parameters())
    opt.step()
    # exp_avg and exp_avg_sq; AdamW's per-tensor `step` scalars (4 bytes each) are not counted.
    states = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert mem["AdamW states (fp32)"] == _nbytes(states)


def test_bf16_plan_counts_16_bit_weights_and_fp32_masters():
    model, _ = _tiny(torch.bfloat16)
    cfg = compose("tiny", ["model.dtype=bfloat16"])
    mem = P.plan(cfg).memory
    assert mem["weights"] == _nbytes(model.parameters())
    n = numel(model)
    assert mem["master weights (fp32)"] == mem["momentum network (fp32)"] == mem["gradients (fp32)"] == 4 * n
    assert mem["AdamW states (fp32)"] == 8 * n


def test_lora_momentum_is_adapter_sized_and_reference_free():
    cfg = preset_cfg("qwen-math-7b", ["model.lora.rank=16", "algo=grpo", "algo.kl_beta=0.04", "algo.siamese=true"])
    plan = P.plan(cfg)
    n_lora = P.arch_of(cfg).lora_params(16, cfg.model.lora.targets)
    assert plan.trainable == n_lora
    assert plan.memory["momentum network (fp32)"] == 4 * n_lora
    assert plan.memory["reference"] == 0  # the base with adapters disabled
    full = P.plan(P.with_lora(cfg, 0))
    assert full.memory["reference"] == 2 * full.params


def test_siamese_off_has_no_momentum_and_popo_no_reference():
    assert P.plan(preset_cfg("qwen-math-7b", ["algo=grpo"])).memory["momentum network (fp32)"] == 0
    assert P.plan(preset_cfg("qwen-math-7b", ["algo.kl_beta=0.5"])).memory["reference"] == 0


# --- activations saved for backward, measured exactly -----------------------------------------



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_saved_activations_match_the_plan_exactly(dtype, checkpointing, kv_heads):
    arch = P.Arch(hidden=128, intermediate=320, layers=2, heads=4, kv_heads=kv_heads, vocab=101, tied=True)
    model = qwen2(arch).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    batch, prompt, completion = 3, 5, 7
    # Distinct rows (repeated ones are forwarded once: popo_core/trainer/logprobs.py); the plan is for those.
    seqs = collate([[5 + b] + [5] * (prompt - 1) for b in range(batch)], [[6] * completion] * batch, 0, "cpu")
    assert seqs.input_ids.shape == (batch, prompt + completion - 1)
    stack, head = P.saved_activation_bytes(arch, batch, prompt, completion, dtype.itemsize, checkpointing)
    assert saved_bytes(model, seqs) == stack + head


def test_checkpointing_saves_far_less_at_preset_scale():
    cfg = preset_cfg("qwen-math-7b")
    with_ckpt = P.plan(cfg)
    without = P.plan(preset_cfg("qwen-math-7b", ["model.gradient_checkpointing=false"]))
    assert with_ckpt.memory["activations"] * 5 < without.memory["activations"]
    assert with_ckpt.activations_other == without.memory["activations"]


# --- sharding, fitting, FLOPs -----------------------------------------------------------------

SHARDED = ("weights", "master weights (fp32)", "gradients (fp32)", "AdamW states (fp32)", "momentum network (fp32)")


def test_sharding_divides_model_state_only():
    cfg = preset_cfg("qwen-math-7b")
    one, four = P.plan(cfg, 1), P.plan(cfg, 4)
    for key in SHARDED:
        assert four.memory[key] == one.memory[key] // 4
    for key in ("activations", "LM-head logits", "vLLM (gpu_memory_utilization share)"):
        assert four.memory[key] == one.memory[key]
    assert four.memory["FSDP all-gather buffer"] > 0 == one.memory["FSDP all-gather buffer"]


def test_7b_full_needs_several_80_gib_gpus_lora_one():
    cfg = preset_cfg("qwen-math-7b")
    n = P.min_gpus(cfg, 80)
    assert n is not None and n > 1
    assert P.plan(cfg, n, gpu_memory_gib=80).fits and not P.plan(cfg, n - 1, gpu_memory_gib=80).fits
    assert P.min_gpus(P.with_lora(cfg, 32), 80) == 1
    fit = P.check_fit(cfg, 80)
    assert not fit.fits and fit.gpus_full == n and fit.gpus_lora == 1


def test_lora_preset_fits_one_24_gib_gpu():
    assert P.plan(preset_cfg("qwen-math-1.5b-lora"), gpu_memory_gib=24).fits


def test_7b_hand_calculation_of_model_state():
    # docs/scaling.md: 2 (bf16 weights) + 4 (fp32 masters) + 4 (grads) + 8 (AdamW) + 4 (momentum) bytes a parameter.
    plan = P.plan(preset_cfg("qwen-math-7b"))
    n = 7_615_616_512
    assert sum(plan.memory[k] for k in SHARDED) == 22 * n


def test_flops_are_six_n_tokens_plus_attention():
    cfg = preset_cfg("qwen-math-7b", ["model.gradient_checkpointing=false", "algo.mini_batches=1", "algo.siamese=false"])
    arch = P.arch_of(cfg)
    f = P.plan(cfg).flops
    C, S, T = 128 * 8, 512 + 3000, 3000
    dense = 6 * (arch.linear_params() * S + arch.vocab * arch.hidden * T) * C
    attention = 6 * arch.layers * arch.hidden * S * S * C
    assert f["train forward+backward"] == pytest.approx(dense + attention)
    assert f["recompute"] == f["pi_old log-probs"] == f["momentum forward"] == 0
    # 6 N D, the usual estimate, is within 10% (attention and the prompt-only head make the rest).
    assert f["train forward+backward"] == pytest.approx(6 * arch.params() * S * C, rel=0.10)
    lora = P.plan(P.with_lora(cfg, 32)).flops["train forward+backward"]
    assert lora < 0.7 * f["train forward+backward"]  # no weight gradients for the frozen base


# --- the CLI ---------------------------------------------------------------------------------

def _math_data(workdir) -> list[str]:
    """The math presets validate their data files; a one-line local file stands in."""
    (workdir / "train.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    return ["data.path=train.jsonl", "data.eval_path=train.jsonl"]


def test_dry_run_prints_the_plan_offline(workdir):
    proc = run_popo("train", "qwen-math-7b", *_math_data(workdir), "--dry-run", "--gpu-memory", "80", cwd=workdir,
                    env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "no-hub")})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "7,615,616,512" in out and "name_or_path: Qwen/Qwen2.5-Math-7B" in out
    assert "smallest number of 80 GiB GPUs that fits: full fine-tuning" in out
    assert not (workdir / "no-hub").exists() and not (workdir / "runs").exists()


@pytest.mark.parametrize("preset", ["tiny", "qwen-math-1.5b", "qwen-math-1.5b-lora"])
def test_dry_run_every_preset(workdir, preset):
    data = _math_data(workdir) if preset != "tiny" else []
    proc = run_popo("train", preset, *data, "--dry-run", "--gpus", "2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "plan per GPU: 2 x 80.0 GiB" in proc.stdout


def test_too_big_for_the_stated_gpu_stops_before_loading(workdir):
    proc = run_popo("train", "qwen-math-7b", *_math_data(workdir), "trainer.device=cuda", "--gpu-memory", "80", cwd=workdir)
    assert_one_line_error(proc, "does not fit 80 GiB GPUs", "model.lora.rank=32")
    assert not (workdir / "runs").exists()


def test_no_fit_check_on_cpu():
    import typer

    from popo_cli.plan_view import preflight

    preflight(preset_cfg("qwen-math-7b", ["trainer.device=cpu"]), 1.0)  # returns: CPU runs are not checked
    with pytest.raises(typer.Exit) as stopped:  # the same run on a stated 1 GiB GPU is refused
        preflight(preset_cfg("qwen-math-7b", ["trainer.device=cuda"]), 1.0)
    assert stopped.value.exit_code == 2


def test_dry_run_without_architecture_is_one_line(workdir):
    proc = run_popo("train", "tiny", "model.name_or_path=org/unknown-model", "--dry-run", cwd=workdir)
    assert_one_line_error(proc, "model.arch.hidden_size is not set")


@pytest.mark.parametrize("override, fragment", [
    ("model.lora.rank=-1", "model.lora.rank"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.targets=[q_proj,lm_head]", "unknown module"),
    ("model.lora.targets=[]", "at least one module"),
    ("model.arch.num_kv_heads=5", "model.arch.num_kv_heads"),
])
def test_bad_lora_and_arch_settings_name_their_key(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        compose("tiny", [override, "model.arch.hidden_size=64", "model.arch.num_heads=4"])


def test_bad_lora_setting_through_the_cli_is_one_line(workdir):
    assert_one_line_error(run_popo("train", "tiny", "model.lora.rank=-1", "--dry-run", cwd=workdir), "model.lora.rank")


def test_bad_plan_flags_are_one_line(workdir):
    assert_one_line_error(run_popo("train", "tiny", "--dry-run", "--gpus", "0", cwd=workdir), "--gpus")
    assert_one_line_error(run_popo("train", "tiny", "--dry-run", "--gpu-memory", "0", cwd=workdir), "--gpu-memory")


def test_reference_rule_matches_the_registry():
    from popo_core.algo.losses import METHODS
    from popo_core.config import AlgoConfig
    from popo_core.trainer.sizing import uses_reference

    for name, method in METHODS.items():
        if "+" in name:
            continue
        algo = AlgoConfig(name=name, kl_beta=0.04)
        assert uses_reference(algo) == method.needs({"kl_beta": 0.04}).reference, name
