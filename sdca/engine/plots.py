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
    for x, _ in starts:
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


def _class_bars(ax, names, series: Dict[str, list], ylabel: str, title: str) -> None:
    import numpy as np

    x = np.arange(len(names))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
               label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def inspect_figures(result: dict, out_dir: str) -> Dict[str, str]:
    """`sdca inspect`'s figures: class shares, mask pass shares (and precision), alignment, confusion matrix."""
    import os

    import numpy as np

    plt = _pyplot()
    names, pc = result["classes"], result["per_class"]
    figures = {}
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5))
    shares = {"source labels": [100 * v for v in pc["source_label_share"]],
              "target predicted": [100 * v for v in pc["target_predicted_share"]]}
    if "with_labels" in result:
        shares["target labels"] = [100 * v for v in result["with_labels"]["target_label_share"]]
    _class_bars(axes[0], names, shares, "% of pixels",
                f"class shares (KL target predicted || source labels = "
                f"{result['kl_target_predicted_vs_source_labels']:.3f} nats)")
    passes = {"Eq. 5 pass": [None if v is None else 100 * v for v in pc["eq5_pass_share"]],
              "Eq. 19 pass": [None if v is None else 100 * v for v in pc["eq19_pass_share"]]}
    if "with_labels" in result:
        wl = result["with_labels"]
        passes["Eq. 5 precision"] = [None if v is None else 100 * v for v in wl["eq5_precision"]]
        passes["Eq. 19 precision"] = [None if v is None else 100 * v for v in wl["eq19_precision"]]
    _class_bars(axes[1], names, passes, "%", "target pixels predicted as the class: share passing each mask")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "classes.png"), dpi=100)
    plt.close(fig)
    figures["classes"] = "classes.png"
    if "alignment" in result:
        al = result["alignment"]
        fig, ax = plt.subplots(figsize=(10, 3.4))
        _class_bars(ax, names, {"source features (labels)": al["source_mahalanobis"],
                                "target features (predicted class)": al["target_mahalanobis"]},
                    "mean Mahalanobis distance", "distance to the class's source Gaussian (lower: closer)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "alignment.png"), dpi=100)
        plt.close(fig)
        figures["alignment"] = "alignment.png"
    if "with_labels" in result:
        cm = np.asarray(result["with_labels"]["confusion"], dtype=np.float64)
        rows = cm.sum(1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        fig, ax = plt.subplots(figsize=(7, 6))
        im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)))
        ax.set_yticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title("target confusion (rows normalised)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "confusion.png"), dpi=100)
        plt.close(fig)
        figures["confusion"] = "confusion.png"
    return figures


def feature_map_figure(rows, labels, domains, class_names, out: str, *, method: str = "pca", seed: int = 0) -> None:
    """Sampled pixel features of both domains in 2-D, coloured by class, marker by domain (the public code's
    t-SNE figure). PCA by default: deterministic, seconds, and its axes mean the same for two checkpoints'
    maps; ``method="tsne"`` for scikit-learn's t-SNE (better separated clusters, slower, layout not comparable)."""
    import numpy as np

    plt = _pyplot()
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("the feature map needs scikit-learn: pip install scikit-learn (make setup installs "
                          "it)") from None
    if method == "pca":
        xy = PCA(n_components=2, random_state=seed).fit_transform(rows)
    elif method == "tsne":
        xy = TSNE(n_components=2, init="pca", random_state=seed,
                  perplexity=min(30.0, max(5.0, len(rows) / 50))).fit_transform(rows)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for domain, marker in (("source", "o"), ("target", "x")):
        for k in np.unique(labels):
            sel = (labels == k) & (domains == domain)
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, marker=marker, color=cmap(int(k) % 20), linewidths=0.6,
                           label=class_names[int(k)] if domain == "source" else None, alpha=0.7)
    ax.set_title(f"pixel features ({method.upper()}); o source (by label), x target (by prediction)", fontsize=9)
    ax.legend(fontsize=6, markerscale=2, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def per_class_bars(names, rows: Dict[str, List[float]], out: str, title: str) -> None:
    """Grouped bars of per-class values (e.g. test IoU of each experiment row)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.8))
    _class_bars(ax, list(names), rows, "IoU (%)", title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
