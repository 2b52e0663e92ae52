"""Training curves of several `popo train` runs side by side: reward, held-out accuracy, entropy and
the two log-prob diagnostics of METHOD.md section 1, for docs/testbed.md.

    .venv/bin/python benchmarks/run_curves.py --out docs/img/testbed-curves.png \\
        "POPO, seed 0=RUN_DIR" "POPO, seed 1=RUN_DIR" "GRPO, seed 0=RUN_DIR" ...

Each argument is LABEL=DIR, DIR holding the run's metrics.jsonl; labels that share their text
before the last comma get one colour. reward/mean is smoothed over 10 steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (("reward/mean", "sampled training reward (10-step mean)"), ("eval/accuracy", "held-out greedy accuracy"),
          ("entropy/mean", "entropy/mean"), ("pos/delta_logp", "pos/delta_logp"),
          ("implicit_neg/delta_logp", "implicit_neg/delta_logp"))


def series(rows: list[dict], key: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    if smooth > 1:
        points = [(s, sum(v for _, v in points[max(0, i - smooth + 1):i + 1]) / len(points[max(0, i - smooth + 1):i + 1]))
                  for i, (s, _) in enumerate(points)]
    return [s for s, _ in points], [v for _, v in points]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    runs = []
    for arg in args.runs:
        label, path = arg.rsplit("=", 1)
        rows = [json.loads(x) for x in (Path(path) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        runs.append((label, rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(label.rsplit(",", 1)[0] for label, _ in runs))
    colors = {f: plt.cm.tab10(i) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        seen = set()
        for label, rows in runs:
            family = label.rsplit(",", 1)[0]
            steps, values = series(rows, key, smooth=10 if key == "reward/mean" else 1)
            ax.plot(steps, values, color=colors[family], lw=1.2, label=None if family in seen else family)
            seen.add(family)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        if key.endswith("delta_logp"):
            ax.axhline(0, color="black", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
