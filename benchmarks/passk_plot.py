"""pass@k curves of several `popo eval --samples K` runs on one axis (log-scale k), and each one's
change from a reference (the first), for docs/testbed.md.

    .venv/bin/python benchmarks/passk_plot.py --out docs/img/testbed-passk.png \\
        "warm start=EVAL_DIR" "GRPO 250, seed 0=EVAL_DIR" ...

Each argument is LABEL=DIR, DIR holding popo eval's summary.json. Runs whose labels share their
text before the last comma ("GRPO 250, seed 0", "GRPO 250, seed 1") get one colour; the first
argument is the reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(eval_dir: str) -> dict[int, float]:
    (summary,) = json.loads((Path(eval_dir) / "summary.json").read_text())
    return {int(k): v for k, v in summary["pass@k"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=EVAL_DIR; the first is the reference")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="held-out pass@k (T = 1.0, 64 samples, unbiased)")
    args = p.parse_args()
    runs = [(label, curve(path)) for label, path in (r.rsplit("=", 1) for r in args.runs)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(label.rsplit(",", 1)[0] for label, _ in runs))
    colors = {f: plt.cm.tab10(i) for i, f in enumerate(families)}
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4))
    ref = runs[0][1]
    for i, (label, c) in enumerate(runs):
        ks = sorted(c)
        family = label.rsplit(",", 1)[0]
        first = label == next(lb for lb, _ in runs if lb.rsplit(",", 1)[0] == family)
        style = dict(color=colors[family], lw=2.5 if i == 0 else 1.2, marker="o", ms=3,
                     label=family if first else None)
        ax.plot(ks, [c[k] for k in ks], **style)
        if i:
            dx.plot(ks, [c[k] - ref[k] for k in ks], **style)
    for a in (ax, dx):
        a.set_xscale("log", base=2)
        a.set_xlabel("k")
        a.grid(alpha=0.3)
    ax.set_ylabel("pass@k")
    dx.set_ylabel(f"pass@k minus {runs[0][0]}'s")
    dx.axhline(0, color="black", lw=0.8)
    ax.legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
