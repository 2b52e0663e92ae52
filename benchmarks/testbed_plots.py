"""The figures and tables of docs/testbed.md from popo's own output files.

    .venv/bin/python benchmarks/testbed_plots.py passk --out docs/img/testbed-passk.png \\
        "warm start=EVAL_DIR" "GRPO 250, seed 0=EVAL_DIR" ...
    .venv/bin/python benchmarks/testbed_plots.py curves --out docs/img/testbed-curves.png \\
        "POPO, seed 0=RUN_DIR" "GRPO, seed 0=RUN_DIR" ...
    .venv/bin/python benchmarks/testbed_plots.py table --vs POPO \\
        "warm start=EVAL_DIR" "POPO, seed 0=EVAL_DIR" "GRPO, seed 0=EVAL_DIR" ...
    .venv/bin/python benchmarks/testbed_plots.py diagnostics "POPO, seed 0=RUN_DIR" ...

Each run is LABEL=DIR. Labels that share their text before the last comma ("GRPO, seed 0", "GRPO,
seed 1") are one method and get one colour; with `--mean` a figure draws each method's mean over
its seeds, shaded from the lowest seed to the highest. `passk`: DIR holds `popo eval --samples K`'s
output; pass@k on one axis (log-scale k) and each curve's change from the first method's (the
reference, in black). `curves`: DIR is a `popo train` run (its metrics.jsonl); reward (10-step mean),
held-out accuracy, entropy and the two log-prob diagnostics of METHOD.md section 1 against the
rollout step. `table`: a markdown table of each method's pass@k (mean over seeds), its pass@1 seed
by seed, and its difference from the `--vs` method on pass@1 and pass@K: paired by seed (the text
after the last comma; a label without one, such as "warm start", pairs with every seed), with a 95%
percentile bootstrap over prompts of the mean difference (samples.jsonl, one value per prompt).
Every run must hold the same prompts with the same number of samples.
`diagnostics`: per method, means over its seeds of the runs' metrics.jsonl: the two log-prob
diagnostics averaged over the steps that logged them, entropy and held-out greedy accuracy at the
last step, and the seconds of a rollout step (generation, update, whole step; popo's `time/*`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from popo_core.evaluation.metrics import bootstrap_interval, k_values, pass_at_k as unbiased_pass_at_k

PANELS = (("reward/mean", "sampled training reward (10-step mean)"), ("eval/accuracy", "held-out greedy accuracy"),
          ("entropy/mean", "entropy/mean"), ("pos/delta_logp", "pos/delta_logp"),
          ("implicit_neg/delta_logp", "implicit_neg/delta_logp"))


def family(label: str) -> str:
    return label.rsplit(",", 1)[0]


def seed_of(label: str) -> str | None:
    return label.rsplit(",", 1)[1].strip() if "," in label else None


def pass_at_k(eval_dir: Path) -> dict[int, float]:
    (summary,) = json.loads((eval_dir / "summary.json").read_text())
    return {int(k): v for k, v in summary["pass@k"].items()}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def series(rows: list[dict], key: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    window = [points[max(0, i - smooth + 1):i + 1] for i in range(len(points))]
    return [s for s, _ in points], [sum(v for _, v in w) / len(w) for w in window]


def per_prompt(eval_dir: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(samples, correct) for each (bench, prompt id) of `popo eval`'s samples.jsonl."""
    counts: dict[tuple[str, str], list[int]] = {}
    for line in (eval_dir / "samples.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            n_c = counts.setdefault((row["bench"], row["id"]), [0, 0])
            n_c[0] += 1
            n_c[1] += bool(row["correct"])
    return {p: (n, c) for p, (n, c) in counts.items()}


def by_family(runs: list[tuple[str, object]]) -> dict[str, list[tuple[str, object]]]:
    groups: dict[str, list[tuple[str, object]]] = {}
    for label, value in runs:
        groups.setdefault(family(label), []).append((label, value))
    return groups


def band(curves: list[dict]) -> tuple[list, list[float], list[float], list[float]]:
    """The keys every curve has, and the curves' mean, lowest and highest value at each."""
    keys = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[k] for c in curves] for k in keys]
    return keys, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def mean_curves(runs: list[tuple[str, dict]]) -> list[tuple[str, dict, dict, dict]]:
    """Each method's (label, mean, lowest, highest) over its seeds, at the k they all share."""
    out = []
    for f, members in by_family(runs).items():
        ks, *curves = band([c for _, c in members])
        out.append((f, *(dict(zip(ks, v)) for v in curves)))
    return out


def passk_figure(plt, runs: list[tuple[str, dict]], style, mean: bool = False):
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4))
    bands = mean_curves(runs) if mean else [(label, c, None, None) for label, c in runs]
    ref_label, ref = family(runs[0][0]) if mean else runs[0][0], bands[0][1]
    for i, (label, c, lo, hi) in enumerate(bands):
        ks = sorted(c)
        ax.plot(ks, [c[k] for k in ks], marker="o", ms=3, **style(label, lw=2.5 if i == 0 else 1.2))
        if i:
            dx.plot(ks, [c[k] - ref[k] for k in ks], marker="o", ms=3, **style(label, lw=1.2))
        if lo is not None and len(by_family(runs)[label]) > 1:
            colour = style(label, lw=0)["color"]
            ax.fill_between(ks, [lo[k] for k in ks], [hi[k] for k in ks], color=colour, alpha=0.15, lw=0)
            dx.fill_between(ks, [lo[k] - ref[k] for k in ks], [hi[k] - ref[k] for k in ks], color=colour,
                            alpha=0.15, lw=0)
    for a in (ax, dx):
        a.set_xscale("log", base=2)
        a.set_xlabel("k")
        a.grid(alpha=0.3)
    ax.set_ylabel("pass@k")
    dx.set_ylabel(f"pass@k minus {ref_label}'s")
    dx.axhline(0, color="black", lw=0.8)
    ax.legend(fontsize=8)
    fig.suptitle("held-out pass@k (T = 1.0, 64 samples, unbiased)" + (", mean over seeds" if mean else ""))
    return fig


def mean_series(members: list[list[dict]], key: str, smooth: int) -> tuple[list[int], list[float], list[float], list[float]]:
    """A metric's mean, lowest and highest over seeds, at the steps every seed logged it."""
    return band([dict(zip(*series(rows, key, smooth))) for rows in members])


def curves_figure(plt, runs: list[tuple[str, list[dict]]], style, mean: bool = False):
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        smooth = 10 if key == "reward/mean" else 1
        if mean:
            for f, members in by_family(runs).items():
                steps, avg, lo, hi = mean_series([rows for _, rows in members], key, smooth)
                ax.plot(steps, avg, **style(f, lw=1.2))
                if len(members) > 1:
                    ax.fill_between(steps, lo, hi, color=style(f, lw=0)["color"], alpha=0.15, lw=0)
        else:
            for label, rows in runs:
                ax.plot(*series(rows, key, smooth=smooth), **style(label, lw=1.2))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        if key.endswith("delta_logp"):
            ax.axhline(0, color="black", lw=0.8)
    axes[0].legend(fontsize=8)
    return fig


def prompt_values(counts: dict, prompts: list, k: int) -> list[float]:
    """Unbiased pass@k of each prompt, in the order of `prompts`."""
    return [unbiased_pass_at_k(*counts[p], k) for p in prompts]


def seeds_of(members: list[tuple[str, dict]]) -> dict[str | None, dict]:
    runs: dict[str | None, dict] = {}
    for label, counts in members:
        if seed_of(label) in runs:
            raise SystemExit(f"two runs of {family(label)!r} with the same seed: {label!r}")
        runs[seed_of(label)] = counts
    return runs


def pairs(members: list[tuple[str, dict]], ref: list[tuple[str, dict]]) -> list[tuple[str | None, dict, dict]]:
    """(seed, run, --vs run) for each seed both sides have; a run without a seed in its label (the
    warm start) stands for every seed of the other side."""
    mine, theirs = seeds_of(members), seeds_of(ref)
    if None in mine:
        return [(seed, mine[None], counts) for seed, counts in theirs.items()]
    return [(seed, counts, theirs.get(seed, theirs.get(None))) for seed, counts in mine.items()
            if seed in theirs or None in theirs]


def per_seed(seed: str | None, value: str) -> str:
    return value if seed is None else f"{seed.removeprefix('seed ')}: {value}"


def paired_difference(members, ref, prompts: list, k: int) -> str:
    """Mean over seeds of the pass@k difference [95% bootstrap over prompts] (each seed's)."""
    matched = pairs(members, ref)
    if not matched:
        return "unpaired"
    rows = [[a - b for a, b in zip(prompt_values(run, prompts, k), prompt_values(other, prompts, k))]
            for _, run, other in matched]
    diffs = [sum(r) / len(prompts) for r in rows]
    lo, hi = bootstrap_interval([sum(col) / len(rows) for col in zip(*rows)])
    each = ", ".join(per_seed(seed, f"{d:+.3f}") for (seed, _, _), d in zip(matched, diffs))
    return f"{sum(diffs) / len(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}] ({each})"


def table(runs: list[tuple[str, dict]], vs: str) -> str:
    """The markdown table described in the module docstring."""
    groups = by_family(runs)
    if vs not in groups:
        raise SystemExit(f"--vs {vs!r} is none of the methods: {', '.join(groups)}")
    for members in groups.values():
        seeds_of(members)  # refuses two runs of one method with one seed
    prompts = sorted(runs[0][1])
    for label, counts in runs:
        if sorted(counts) != prompts:
            raise SystemExit(f"{label!r} was evaluated on other prompts than {runs[0][0]!r}")
    samples = {n for _, counts in runs for n, _ in counts.values()}
    if len(samples) != 1:
        raise SystemExit(f"the runs have different numbers of samples per prompt: {sorted(samples)}")
    ks = k_values(samples.pop())
    head = ["method", "seeds", *(f"pass@{k}" for k in ks), "pass@1 by seed", f"pass@1 minus {vs}",
            f"pass@{ks[-1]} minus {vs}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, members in groups.items():
        means = [sum(sum(prompt_values(c, prompts, k)) for _, c in members) / len(prompts) / len(members) for k in ks]
        by_seed = ", ".join(per_seed(seed_of(label), f"{sum(prompt_values(c, prompts, 1)) / len(prompts):.3f}")
                            for label, c in members)
        versus = ["", ""] if f == vs else [paired_difference(members, groups[vs], prompts, k) for k in (1, ks[-1])]
        lines.append("| " + " | ".join([f, str(len(members)), *(f"{m:.3f}" for m in means), by_seed, *versus]) + " |")
    return "\n".join(lines)


DIAGNOSTICS = (("implicit_neg/delta_logp", "mean", "implicit_neg/delta_logp, mean over steps", "{:+.4f}"),
               ("pos/delta_logp", "mean", "pos/delta_logp, mean over steps", "{:+.4f}"),
               ("entropy/mean", "last", "entropy, last step", "{:.3f}"),
               ("eval/accuracy", "last", "held-out greedy, last step", "{:.3f}"),
               ("time/generate_s", "mean", "generate s/step", "{:.2f}"),
               ("time/update_s", "mean", "update s/step", "{:.2f}"),
               ("time/step_s", "mean", "step s", "{:.2f}"))


def diagnostics(runs: list[tuple[str, list[dict]]]) -> str:
    """The markdown table described in the module docstring."""
    head = ["method", "seeds", *(title for _, _, title, _ in DIAGNOSTICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, members in by_family(runs).items():
        cells = []
        for key, how, _, fmt in DIAGNOSTICS:
            per_run = [[r[key] for r in rows if key in r] for _, rows in members]
            per_run = [v for v in per_run if v]
            picked = [sum(v) / len(v) if how == "mean" else v[-1] for v in per_run]
            cells.append(fmt.format(sum(picked) / len(picked)) if picked else "")
        lines.append("| " + " | ".join([f, str(len(members)), *cells]) + " |")
    return "\n".join(lines)


def styler(plt, labels: list[str], reference: bool):
    """style(label, lw): one colour and one legend entry per method; with `reference` the first
    method is drawn in black, so a method keeps its colour across figures."""
    families = list(dict.fromkeys(family(label) for label in labels))
    ref = families.pop(0) if reference else None
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)} | ({ref: "black"} if ref else {})
    labelled: set[str] = set()

    def style(label: str, lw: float) -> dict:
        f = family(label)
        first, _ = f not in labelled, labelled.add(f)
        return {"color": colors[f], "lw": lw, "label": f if first else None}

    return style


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=["passk", "curves", "table", "diagnostics"])
    p.add_argument("runs", nargs="+", help="LABEL=DIR")
    p.add_argument("--out", type=Path, help="the figure's file (passk, curves)")
    p.add_argument("--mean", action="store_true", help="one curve per method: the mean over its seeds")
    p.add_argument("--vs", help="table: the method the others are compared with (default: the first)")
    args = p.parse_args()
    read = {"passk": pass_at_k, "curves": metrics, "table": per_prompt, "diagnostics": metrics}[args.figure]
    runs = [(label, read(Path(path))) for label, path in (r.rsplit("=", 1) for r in args.runs)]
    if args.figure == "table":
        print(table(runs, args.vs or family(runs[0][0])))
        return
    if args.figure == "diagnostics":
        print(diagnostics(runs))
        return
    if args.out is None:
        p.error(f"{args.figure} needs --out")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = styler(plt, [label for label, _ in runs], reference=args.figure == "passk")
    fig = (passk_figure if args.figure == "passk" else curves_figure)(plt, runs, style, mean=args.mean)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=115)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
