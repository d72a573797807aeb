"""Figures for reports, drawn with matplotlib (an optional dependency: `make setup` installs it; training and
inference never need it, and asking for a plot without it is an error that says what to install)."""
from __future__ import annotations

import json
from typing import Dict, List, Tuple


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (make setup installs it)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_curves(metrics_path: str) -> Tuple[Dict[str, List[Tuple[int, float]]], Dict[str, List[Tuple[int, float]]],
                                             List[Tuple[int, str]]]:
    """From metrics.jsonl: loss series and adaptation gradient-share series, keyed 'stage / term', on one step axis
    with the stages one after another; and where each stage starts."""
    losses, shares, starts = {}, {}, []
    offset, last_stage, last_step = 0, None, 0
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "step" not in r or "eval" in r or "loss_ce" not in r:
                continue
            if r["stage"] != last_stage:
                offset += last_step
                last_stage = r["stage"]
                starts.append((offset, r["stage"]))
            last_step = r["step"]
            x = offset + r["step"]
            for k, v in r.items():
                if k.startswith("loss_"):
                    losses.setdefault(f"{r['stage']} / {k[5:]}", []).append((x, v))
                elif k.startswith("gradshare_"):
                    shares.setdefault(f"{r['stage']} / {k[10:]}", []).append((x, v))
    return losses, shares, starts


def plot_curves(metrics_path: str, out: str) -> None:
    """Loss curves of every stage and, below, each adaptation term's gradient share relative to CE (log scale)."""
    plt = _pyplot()
    losses, shares, starts = read_curves(metrics_path)
    panels = 2 if shares else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels), sharex=True, squeeze=False)
    ax = axes[0][0]
    for name, pts in sorted(losses.items()):
        ax.plot(*zip(*pts), label=name, linewidth=1.2)
    ax.set_ylabel("loss")
    ax.set_title("training losses (stages one after another)")
    for x, stage in starts:
        ax.axvline(x, color="0.8", linewidth=0.8)
    if losses:
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    if shares:
        ax2 = axes[1][0]
        for name, pts in sorted(shares.items()):
            ax2.plot(*zip(*pts), label=name, linewidth=1.2)
        ax2.set_yscale("log")
        ax2.set_ylabel("|grad| / |grad CE|")
        ax2.set_title("adaptation: each term's gradient at the backbone features, relative to CE")
        ax2.legend(fontsize=7, loc="upper right")
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
