"""Tables and plots from the runs of benchmarks/vs_trl: benchmarks/RESULTS.md and benchmarks/img/vs_trl_*.png."""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

THRESHOLDS = (0.5, 0.9)
ALL_POSITIVE = 0.95
ORDER = (("popo", "popo"), ("popo", "grpo"), ("trl", "grpo"))
NAMES = {("popo", "popo"): "popo POPO", ("popo", "grpo"): "popo GRPO", ("trl", "grpo"): "TRL GRPO"}

DIFFERENCES = """\
Aligned in both tools: popo's own random-init tiny Qwen2 (2 layers, 64 wide) and character tokenizer for
the seed (saved with `save_pretrained`, loaded by TRL with `PreTrainedTokenizerFast`; weights digest
checked), the task (`a+b=` -> `(a+b) mod 10` over the 100 prompts, reward = exact match through popo's
`ExactMatch`), held-out greedy accuracy on all 100 prompts computed by popo's `evaluate_problems` on
each tool's live model, prompts per rollout, completions per prompt (`num_generations`), completion
length (`max_completion_length`), updates per rollout (`num_iterations` x `steps_per_generation`,
completions per optimizer step = `per_device_train_batch_size`), learning rate (constant, no warm-up),
optimizer (`torch.optim.AdamW`: TRL `optim="adamw_torch"`, betas 0.9/0.999, eps 1e-8, weight decay 0,
gradient clip 1.0), clip eps 0.2, temperature 1, top-p 1 (TRL top-k 0), seeds, one CPU thread
(`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`), fp32 (TRL `bf16=False`), no gradient checkpointing
(TRL `gradient_checkpointing=False`, `activation_checkpointing=False`), TRL `loss_type="grpo"` (popo
`seq_mean_token_mean`), `beta=0` (popo `kl_beta=0`), `scale_rewards="group"` (popo `scale_std=true`,
unbiased std in both), `use_vllm=False`, `use_cpu=True`; TRL's hard-coded advantage epsilon 1e-4 is
given to popo's GRPO too (`algo.adv_eps=1e-4`; popo's default is 1e-6). TRL samples with
`suppress_tokens` = popo's suppressed ids (pad, bos, unk), so both draw from the same support.

Still different:
- **Log-probs of suppressed tokens.** popo's log-probs are of the distribution it sampled from (the
  suppressed tokens removed from the softmax); TRL's are over the whole vocabulary, so its ratios and
  entropies include the mass on pad/bos/unk. (The cross-check therefore runs popo without suppression.)
- **Sampling noise.** popo draws by Gumbel-max from a hash of (seed, step, prompt, sample); TRL by
  `torch.multinomial` from torch's generator: same distribution, different draws.
- **Prompt order.** popo: seeded permutations of the 100 prompts per epoch; TRL: its `RepeatSampler`
  with the same seed. Same prompts, different order.
- **Mini-batches.** popo cuts each pass into disjoint slices of whole groups, drawn anew each pass;
  TRL shuffles the rollout's completions once (groups split across mini-batches; advantages are
  computed before) and reuses the same slices in both passes.
- **Extra work TRL does.** Every loss forward computes token entropies; on CPU its fused LM head scores
  every position (prompt included), not only completion tokens (the compact path needs Triton).
- **Work popo does not repeat.** popo forwards each distinct sequence once (a group's repeated
  completions, and all of a group when completions are one token, fold onto one row; only distinct
  positions go through the LM head) and computes each prompt's KV cache once for its samples; TRL
  forwards and prefills every completion's row. Same loss and gradient (the cross-check runs
  through popo's folded forward).
- **Logging.** popo logs every step to `metrics.jsonl` and to MLflow (SQLite, as shipped), the latter
  in batches every 5 s and at checkpoints, and draws a rich progress bar; TRL runs with
  `report_to="none"`, a tqdm bar and a printed log line per rollout step. popo checkpoints
  only at the end (`trainer.save_every` = the budget; TRL saves nothing) and writes its policy,
  curves and MLflow artifacts after the last step; that tail counts in the command's wall time, not
  in any step.
- **arith shape.** The same for the testbed (docs/testbed.md): the warm-start model (identical for
  every seed), the arith prompts and held-out set, reward = popo's `FinalAnswer` on the text after the
  last `=`, completions up to 48 tokens ended by EOS, lr 1e-4 (the preset's; 1e-3 wrecks the warm
  start). Ten rollout steps: a cost measurement, not a learning one.
- **POPO** has no advantage and no epsilon; it runs its momentum network and similarity penalty
  (METHOD.md sections 2-3) at the tiny preset's defaults.
"""


def load_runs(out: Path) -> list[dict]:
    runs = []
    for f in sorted(out.glob("*-seed*-steps*.json")):
        runs.append(json.loads(f.read_text()))
    return runs


def per_run(run: dict, n_opt: int) -> dict:
    """One run's step table: wall-clock interval per rollout step, in-loop phases, evaluations."""
    rows = sorted(run["rows"], key=lambda r: r["step"])
    by_step = {r["step"]: r for r in rows}
    steps = []
    for r in rows:
        if r["step"] == 0 or (r["step"] - 1) not in by_step:
            continue
        interval = r["wall_s"] - by_step[r["step"] - 1]["wall_s"]
        steps.append({"step": r["step"], "wall": interval, "eval": "eval/accuracy" in r,
                      "gen": r["time/generate_s"], "grade": r["time/grade_s"], "update": r["time/update_s"],
                      "loop": r["time/step_s"], "outside": interval - r["time/step_s"],
                      "pos": r["positives/fraction"], "tokens": r["train/forward_tokens"] / n_opt})
    first = by_step.get(1)
    startup = first["wall_s"] - first["time/step_s"] if first else float("nan")
    curve = [(r["step"], r["wall_s"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return {"steps": steps, "startup": startup, "curve": curve, "wall": run["wall_s"], "rss": run["peak_rss_mb"]}


def _stats(values: list[float]) -> tuple[float, float]:
    return (statistics.median(values), statistics.mean(values)) if values else (float("nan"), float("nan"))


def timing(runs: list[dict], n_opt: int) -> dict:
    """Pooled over seeds. Wall-clock step times leave out steps with an evaluation."""
    parsed = [per_run(r, n_opt) for r in runs]
    steps = [s for p in parsed for s in p["steps"]]
    timed = [s for s in steps if not s["eval"]]
    pos = [s for s in timed if s["pos"] >= ALL_POSITIVE]
    out = {"n_steps": len(timed), "n_pos": len(pos)}
    for key in ("wall", "gen", "grade", "update", "loop", "outside"):
        med, mean = _stats([s[key] for s in timed])
        out[key] = {"median": med, "mean": mean,
                    "mean_pos": statistics.mean(s[key] for s in pos) if pos else float("nan")}
    out["tokens"] = statistics.mean(s["tokens"] for s in steps) if steps else float("nan")
    out["tokens_pos"] = statistics.mean(s["tokens"] for s in steps if s["pos"] >= ALL_POSITIVE) \
        if any(s["pos"] >= ALL_POSITIVE for s in steps) else float("nan")
    out["startup"] = statistics.mean(p["startup"] for p in parsed)
    out["rss"] = max(p["rss"] for p in parsed)
    out["total"] = statistics.mean(p["wall"] for p in parsed)
    return out


def reach(curve: list[tuple[int, float, float]], threshold: float) -> tuple[int | None, float | None]:
    for step, wall, acc in curve:
        if acc >= threshold:
            return step, wall
    return None, None


def efficiency(runs: list[dict], n_opt: int) -> dict:
    curves = [per_run(r, n_opt)["curve"] for r in runs]
    out = {"n": len(curves), "auc": statistics.mean(statistics.mean(a for _, _, a in c) for c in curves),
           "final": [c[-1][2] for c in curves], "curves": curves}
    for t in THRESHOLDS:
        hits = [reach(c, t) for c in curves]
        out[t] = {"steps": [h[0] for h in hits], "wall": [h[1] for h in hits]}
    return out


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return "n/a" if not (a == a and b == b and b) else f"{a / b:.2f}x"


def reached(values: list, digits: int = 0) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"not reached (0/{len(values)})"
    mean = statistics.mean(got)
    text = f"{mean:.{digits}f}" + (f" [{min(got):.{digits}f}-{max(got):.{digits}f}]" if len(got) > 1 else "")
    return text + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)} seeds)")


KEPT = "<!-- kept when benchmarks/vs_trl rewrites this file -->"


def write_report(out: Path, results: Path, shapes, lrs: list[float], meta: dict) -> None:
    runs = load_runs(out)
    img = results.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    lines = ["# popo vs TRL's GRPOTrainer, side by side", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on this project's shared 2-core CPU machine (no GPU), "
             "each command on one thread, the tools alternated run by run (the order rotated with the seed). "
             "Absolute seconds depend on the machine's load; the ratios popo / TRL are the result "
             "(< 1: popo faster).", "",
             "Reproduce (about 50 minutes on a shared 2-core machine; runs are kept in `benchmarks/vs_trl_runs/` and "
             "not redone; `--steps 4 --seeds 1 --lrs 1e-3 --out /tmp/smoke` is a 5-minute smoke test):", "",
             "```bash", meta.get("command", ".venv/bin/python benchmarks/vs_trl"), "```", "",
             f"TRL {meta.get('trl', '?')} (TRL version, torch) in `benchmarks/.venv-trl`, built by the script. "
             f"Cross-check before the runs (`tests/algo/test_vs_trl.py` in TRL's venv: popo's `grpo` loss and gradient "
             f"against TRL's own `compute_loss` and advantages, within 1e-6): **{meta.get('cross_check', 'not run')}**. "
             f"`popo --help`, best of 5 in the same session: {fmt(meta.get('help_s', float('nan')), 2)} s.", ""]
    summary = []
    summary_at = len(lines)
    all_lrs = lrs
    for shape in shapes:
        lrs = list(shape.lrs or all_lrs)
        n_opt = shape.optimizer_steps_per_rollout
        timed = {k: [r for r in runs if r["shape"] == shape.name and (r["tool"], r["method"]) == k and r["lr"] == lrs[0]]
                 for k in ORDER}
        if not all(timed.values()):
            lines += [f"## {shape.title}", "", "(no complete set of runs yet)", ""]
            continue
        seeds = len(timed[ORDER[2]])
        t = {k: timing(v, n_opt) for k, v in timed.items()}
        trl = t[("trl", "grpo")]
        lines += [f"## {shape.title}", "",
                  f"{shape.steps} rollout steps = {shape.steps * n_opt} optimizer steps of "
                  f"{shape.completions_per_optimizer_step} completions, lr {lrs[0]:g}, seeds 0-{seeds - 1}; "
                  f"every step of every seed pooled. 'step' is wall clock between the run's consecutive step "
                  f"lines (logging included; steps with an evaluation left out); generation, scoring and "
                  f"update are each tool's in-loop timers (TRL: around its `_generate` and the reward "
                  f"function; update = the rest of the rollout's optimizer steps, pi_old recomputation "
                  f"included). 'all-positive' = steps whose positive fraction is >= {ALL_POSITIVE} "
                  f"(counts in the table).", "",
                  "| per rollout step (s) | " + " | ".join(NAMES[k] for k in ORDER) +
                  " | popo POPO / TRL | popo GRPO / TRL |", "|---|" + "---|" * 5]

        def row(name: str, get) -> str:
            vals = [get(t[k]) for k in ORDER]
            return (f"| {name} | " + " | ".join(fmt(v) for v in vals) +
                    f" | {ratio(vals[0], vals[2])} | {ratio(vals[1], vals[2])} |")

        for key, name in (("wall", "step"), ("gen", "generation"), ("grade", "scoring"), ("update", "update")):
            lines.append(row(f"{name}, median", lambda x, key=key: x[key]["median"]))
            lines.append(row(f"{name}, mean", lambda x, key=key: x[key]["mean"]))
            lines.append(row(f"{name}, mean all-positive", lambda x, key=key: x[key]["mean_pos"]))
        lines.append(row("outside the in-loop step timer (logging, progress bar), mean", lambda x: x["outside"]["mean"]))
        if n_opt > 1:
            lines.append(row(f"per optimizer step (step / {n_opt}), median", lambda x: x["wall"]["median"] / n_opt))
            lines.append(row(f"per optimizer step (step / {n_opt}), mean", lambda x: x["wall"]["mean"] / n_opt))
            lines.append(row(f"update per optimizer step, mean", lambda x: x["update"]["mean"] / n_opt))
        lines.append(row("completion tokens through backward per optimizer step, mean", lambda x: x["tokens"]))
        lines.append(row("same, all-positive steps", lambda x: x["tokens_pos"]))
        lines.append(row("start-up to the first step (s)", lambda x: x["startup"]))
        lines.append(row("whole command (s)", lambda x: x["total"]))
        lines.append(row("peak resident memory (MB)", lambda x: x["rss"]))
        lines.append("| steps timed / all-positive | " + " | ".join(f"{t[k]['n_steps']} / {t[k]['n_pos']}" for k in ORDER)
                     + " | | |")
        lines.append("")
        summary.append((shape, {k: (t[k]["wall"]["median"] / trl["wall"]["median"], t[k]["wall"]["mean"] / trl["wall"]["mean"])
                                for k in ORDER[:2]}))
        if not shape.timing_only:
            lines += efficiency_section(runs, shape, lrs, n_opt, img)
    lines[summary_at:summary_at] = targets_section(summary)
    learning = [s for s in shapes if not s.timing_only]
    if learning:
        tta = time_to_accuracy_png(runs, learning, all_lrs, img)
        lines += ["## Time to accuracy", "", f"![wall time to held-out accuracy 0.5 and 0.9](img/{tta.name})", ""]
    lines += ["## What still differs", "", DIFFERENCES]
    # Sections other benchmarks append after KEPT (benchmarks/packing.py's) survive a rewrite.
    old = results.read_text() if results.exists() else ""
    kept = old[old.index(KEPT):].rstrip("\n").split("\n") if KEPT in old else []
    results.write_text("\n".join(lines + ([""] + kept if kept else [])) + "\n")
    print(f"wrote {results}")
    for shape, r in summary:
        print(f"{shape.name}: step time popo/TRL (median, mean): POPO {r[('popo', 'popo')][0]:.2f}x {r[('popo', 'popo')][1]:.2f}x,"
              f" GRPO {r[('popo', 'grpo')][0]:.2f}x {r[('popo', 'grpo')][1]:.2f}x")


# The speed targets popo holds itself to (popo / TRL GRPO, at the first learning rate).
TARGETS = (("matched", ("popo", "popo"), 0, 0.35, "popo POPO, median time per rollout step"),
           ("matched", ("popo", "grpo"), 0, 0.6, "popo GRPO, median time per rollout step"),
           ("preset", ("popo", "popo"), 1, 0.6, "popo POPO, mean time per rollout step over the whole run"))


def targets_section(summary) -> list[str]:
    got = {shape.name: r for shape, r in summary}
    lines = ["## Targets", "", "| shape | what | target | measured | |", "|---|---|---|---|---|"]
    for shape, key, which, target, what in TARGETS:
        if shape in got:
            value = got[shape][key][which]
            lines.append(f"| {shape} | {what} | <= {target:.2f}x | {value:.2f}x | {'met' if value <= target else 'not met'} |")
    for name, r in got.items():
        if name not in {t[0] for t in TARGETS}:
            lines.append(f"| {name} | popo POPO, popo GRPO: median (mean) time per rollout step | none | "
                         f"{r[('popo', 'popo')][0]:.2f}x ({r[('popo', 'popo')][1]:.2f}x), "
                         f"{r[('popo', 'grpo')][0]:.2f}x ({r[('popo', 'grpo')][1]:.2f}x) | |")
    return lines + [""]


def best_lr(runs: list[dict], shape, key, lrs, n_opt) -> tuple[float | None, dict]:
    scored = {}
    for lr in lrs:
        mine = [r for r in runs if r["shape"] == shape.name and (r["tool"], r["method"]) == key and r["lr"] == lr]
        if mine:
            scored[lr] = efficiency(mine, n_opt)
    if not scored:
        return None, {}
    lr = max(scored, key=lambda x: (scored[x]["auc"], statistics.mean(scored[x]["final"])))
    return lr, scored


def efficiency_section(runs, shape, lrs, n_opt, img: Path) -> list[str]:
    lines = [f"### Sample efficiency: {shape.name}", "",
             f"Held-out greedy accuracy (all held-out prompts, popo's evaluation for both tools) every {shape.eval_every} "
             f"rollout steps. Each method at its best learning rate of {{{', '.join(f'{x:g}' for x in lrs)}}} (highest "
             f"mean accuracy over the evaluations, i.e. area under the curve, averaged over seeds). Steps and "
             f"wall time (from the command's start, start-up included) until accuracy first reaches the "
             f"threshold: mean [min-max] over the seeds that reached it.", "",
             "| method | best lr | seeds | AUC at each lr | final accuracy | steps to 0.5 | steps to 0.9 | "
             "wall s to 0.5 | wall s to 0.9 |", "|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for key in ORDER:
        lr, scored = best_lr(runs, shape, key, lrs, n_opt)
        if lr is None:
            continue
        e = scored[lr]
        best[key] = (lr, e)
        aucs = ", ".join(f"{x:g}: {scored[x]['auc']:.2f}" for x in scored)
        lines.append(f"| {NAMES[key]} | {lr:g} | {e['n']} | {aucs} | {reached(e['final'], 2)} | "
                     f"{reached(e[0.5]['steps'])} | {reached(e[0.9]['steps'])} | {reached(e[0.5]['wall'])} | "
                     f"{reached(e[0.9]['wall'])} |")
    lines.append("")
    if best:
        png = curves_png(shape, best, img)
        lines += [f"![held-out accuracy against rollout step and wall time, {shape.name}](img/{png.name})", ""]
    return lines


def curves_png(shape, best: dict, img: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {("popo", "popo"): "tab:blue", ("popo", "grpo"): "tab:orange", ("trl", "grpo"): "tab:green"}
    for key, (lr, e) in best.items():
        for i, curve in enumerate(e["curves"]):
            steps, walls, accs = zip(*curve)
            kw = {"color": colors[key], "alpha": 0.8, "lw": 1.2}
            name = f"{NAMES[key]} (lr {lr:g})" if i == 0 else None
            axes[0].plot(steps, accs, label=name, **kw)
            axes[1].plot(walls, accs, label=name, **kw)
    for ax, xlabel in zip(axes, ("rollout step", "wall time from the command's start (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out greedy accuracy")
        ax.set_ylim(-0.02, 1.02)
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{shape.title} (one line per seed)", fontsize=10)
    fig.tight_layout()
    path = img / f"vs_trl_curves_{shape.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_to_accuracy_png(runs, shapes, lrs, img: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        n_opt = shape.optimizer_steps_per_rollout
        for j, key in enumerate(ORDER):
            lr, scored = best_lr(runs, shape, key, lrs, n_opt)
            if lr is None:
                continue
            for i, t in enumerate(THRESHOLDS):
                walls = scored[lr][t]["wall"]
                got = [w for w in walls if w is not None]
                x = i * 4 + j
                if got:
                    ax.bar(x, statistics.mean(got), color=f"C{j}", label=NAMES[key] if i == 0 else None)
                    ax.scatter([x] * len(got), got, color="black", s=8, zorder=3)
                missing = len(walls) - len(got)
                if missing:
                    ax.text(x, (statistics.mean(got) if got else 0) + 1, f"{missing} not\nreached", ha="center", fontsize=7)
        ax.set_xticks([1, 5])
        ax.set_xticklabels([f"accuracy {t}" for t in THRESHOLDS])
        ax.set_ylabel("wall time from the command's start (s)")
        ax.set_title(shape.name, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("time to held-out accuracy (bars: mean over seeds that reached it; dots: seeds), best lr each",
                 fontsize=10)
    fig.tight_layout()
    path = img / "vs_trl_time_to_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
