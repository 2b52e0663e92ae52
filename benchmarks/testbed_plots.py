"""The figures of docs/testbed.md from popo's own output files.

    .venv/bin/python benchmarks/testbed_plots.py passk --out docs/img/testbed-passk.png \\
        "warm start=EVAL_DIR" "GRPO 250, seed 0=EVAL_DIR" ...
    .venv/bin/python benchmarks/testbed_plots.py curves --out docs/img/testbed-curves.png \\
        "POPO, seed 0=RUN_DIR" "GRPO, seed 0=RUN_DIR" ...

Each run is LABEL=DIR. `passk`: DIR holds `popo eval --samples K`'s summary.json; pass@k on one axis
(log-scale k) and each curve's change from the first run's (the reference). `curves`: DIR is a
`popo train` run (its metrics.jsonl); reward (10-step mean), held-out accuracy, entropy and the two
log-prob diagnostics of METHOD.md section 1 against the rollout step. Labels that share their text
before the last comma ("GRPO 250, seed 0", "GRPO 250, seed 1") get one colour.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (("reward/mean", "sampled training reward (10-step mean)"), ("eval/accuracy", "held-out greedy accuracy"),
          ("entropy/mean", "entropy/mean"), ("pos/delta_logp", "pos/delta_logp"),
          ("implicit_neg/delta_logp", "implicit_neg/delta_logp"))


def family(label: str) -> str:
    return label.rsplit(",", 1)[0]


def pass_at_k(eval_dir: Path) -> dict[int, float]:
    (summary,) = json.loads((eval_dir / "summary.json").read_text())
    return {int(k): v for k, v in summary["pass@k"].items()}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def series(rows: list[dict], key: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    window = [points[max(0, i - smooth + 1):i + 1] for i in range(len(points))]
    return [s for s, _ in points], [sum(v for _, v in w) / len(w) for w in window]


def passk_figure(plt, runs: list[tuple[str, dict]], style):
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4))
    ref_label, ref = runs[0]
    for i, (label, c) in enumerate(runs):
        ks = sorted(c)
        ax.plot(ks, [c[k] for k in ks], marker="o", ms=3, **style(label, lw=2.5 if i == 0 else 1.2))
        if i:
            dx.plot(ks, [c[k] - ref[k] for k in ks], marker="o", ms=3, **style(label, lw=1.2))
    for a in (ax, dx):
        a.set_xscale("log", base=2)
        a.set_xlabel("k")
        a.grid(alpha=0.3)
    ax.set_ylabel("pass@k")
    dx.set_ylabel(f"pass@k minus {ref_label}'s")
    dx.axhline(0, color="black", lw=0.8)
    ax.legend(fontsize=8)
    fig.suptitle("held-out pass@k (T = 1.0, 64 samples, unbiased)")
    return fig


def curves_figure(plt, runs: list[tuple[str, list[dict]]], style):
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        for label, rows in runs:
            ax.plot(*series(rows, key, smooth=10 if key == "reward/mean" else 1), **style(label, lw=1.2))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        if key.endswith("delta_logp"):
            ax.axhline(0, color="black", lw=0.8)
    axes[0].legend(fontsize=8)
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=["passk", "curves"])
    p.add_argument("runs", nargs="+", help="LABEL=DIR")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    read = pass_at_k if args.figure == "passk" else metrics
    runs = [(label, read(Path(path))) for label, path in (r.rsplit("=", 1) for r in args.runs)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {f: plt.cm.tab10(i) for i, f in enumerate(dict.fromkeys(family(label) for label, _ in runs))}
    labelled: set[str] = set()

    def style(label: str, lw: float) -> dict:  # one colour and one legend entry per family
        f = family(label)
        first, _ = f not in labelled, labelled.add(f)
        return {"color": colors[f], "lw": lw, "label": f if first else None}

    fig = (passk_figure if args.figure == "passk" else curves_figure)(plt, runs, style)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=115)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
