"""TRL's GRPOTrainer on popo's setup; runs inside the TRL virtual environment (benchmarks/.venv-trl).

    python trl_side.py SPEC.json

SPEC (written by vs_trl.py) names the saved popo model, the task's problems, the shape, the learning
rate and the seed. popo's repository is on PYTHONPATH: the held-out evaluation and the reward are
popo's own functions (popo_core.evaluation.metrics, popo_core.grading.verifiers), so both tools are graded alike.
Writes one JSON line per rollout step to SPEC["out"] (and step 0: the evaluation before training).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from popo_core.data.datasets import Problem
    from popo_core.evaluation.metrics import evaluate_problems
    from popo_core.data.tasks import make_verifier
    from popo_core.rollout.hf import HFEngine

    # PITFALLS.md: AutoTokenizer on a qwen2 directory returns a byte-level tokenizer; load the local one as itself.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    digest = weights_digest(model)
    if digest != spec["weights_digest"]:
        raise SystemExit(f"loaded weights {digest} differ from popo's {spec['weights_digest']}")
    train_set = [Problem(**p) for p in spec["train"]]
    eval_set = [Problem(**p) for p in spec["eval"]]
    verifier = make_verifier(spec["task"])
    sh = spec["shape"]
    per_step = sh["prompts"] * sh["group_size"] // sh["mini_batches"]
    opt_per_rollout = sh["epochs"] * sh["mini_batches"]
    engine = HFEngine(model, tokenizer)  # popo's greedy evaluation, on TRL's live model

    timers = {"generate": 0.0, "grade": 0.0, "rewards": [], "tokens": 0}

    def exact_match(prompts, completions, answer, **_):
        start = time.perf_counter()
        grades = verifier(completions, answer)
        timers["grade"] += time.perf_counter() - start
        out = [float(g.correct) for g in grades]
        timers["rewards"].extend(out)
        return out

    dataset = Dataset.from_list([{"prompt": p.problem, "answer": p.answer} for p in train_set])
    args = GRPOConfig(
        output_dir=spec["work_dir"],
        loss_type="grpo", beta=0.0, scale_rewards="group", epsilon=0.2,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        num_generations=sh["group_size"], steps_per_generation=sh["mini_batches"], num_iterations=sh["epochs"],
        max_completion_length=sh["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        # Sample from the same support as popo, which never samples pad/bos/unk (PITFALLS.md).
        generation_kwargs={"suppress_tokens": engine.suppress} if spec["suppress"] else None,
        max_steps=spec["steps"] * opt_per_rollout, seed=spec["seed"], data_seed=spec["seed"],
        bf16=False, fp16=False, use_cpu=True, use_vllm=False,
        gradient_checkpointing=False, activation_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=opt_per_rollout, disable_tqdm=False,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    _generate = trainer._generate

    def timed_generate(prompts):
        start = time.perf_counter()
        out = _generate(prompts)
        timers["generate"] += time.perf_counter() - start
        return out

    trainer._generate = timed_generate  # generation (tokenise, sample, decode), as popo's time/generate_s
    _compute_loss = trainer._compute_loss

    def counting_loss(model_, inputs):
        timers["tokens"] += int(inputs["completion_mask"].sum())  # completion tokens through forward/backward
        return _compute_loss(model_, inputs)

    trainer._compute_loss = counting_loss
    out = open(spec["out"], "a")

    def evaluate() -> float:
        report = evaluate_problems(engine, tokenizer, eval_set, verifier, template="plain",
                                   max_new_tokens=sh["max_new_tokens"], greedy=True, batch_prompts=256)
        return report.accuracy

    def write(row: dict) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()

    class Record(TrainerCallback):
        def __init__(self):
            self.begin = None

        def on_train_begin(self, args_, state, control, **kw):
            write({"step": 0, "eval/accuracy": evaluate()})

        def on_step_begin(self, args_, state, control, **kw):
            if state.global_step % opt_per_rollout == 0:
                self.begin = time.perf_counter()
                timers.update(generate=0.0, grade=0.0, rewards=[], tokens=0)

        def on_step_end(self, args_, state, control, **kw):
            if state.global_step % opt_per_rollout:
                return
            step = state.global_step // opt_per_rollout
            end = time.perf_counter()
            rewards = timers["rewards"]
            gen, grade, total = timers["generate"], timers["grade"], end - self.begin
            row = {"step": step, "time/generate_s": gen, "time/grade_s": grade,
                   "time/update_s": total - gen - grade, "time/step_s": total,
                   "reward/mean": sum(rewards) / max(len(rewards), 1),
                   "positives/fraction": sum(r > 0.5 for r in rewards) / max(len(rewards), 1),
                   "train/forward_tokens": timers["tokens"]}
            if step % sh["eval_every"] == 0 or step == spec["steps"]:
                row["eval/accuracy"] = evaluate()
            write(row)

    trainer.add_callback(Record())
    trainer.train()
    out.close()


def weights_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    main(sys.argv[1])
