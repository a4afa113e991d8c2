"""Plots of a run, drawn with matplotlib's headless backend."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion(confusion, class_names, path: str, title: str = "") -> None:
    """A labelled confusion matrix: rows are true classes, columns predictions."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        threshold = confusion.max() / 2
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if confusion[i, j] > threshold else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(workdir: str) -> str:
    """Draws workdir/curves.png from workdir/metrics.jsonl: loss, accuracy and learning rate
    against epoch, train and test. Returns the path written."""
    import os

    from resnet_jax.workdir import read_metrics

    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    split = {s: sorted((r for r in records if r["split"] == s), key=lambda r: r["step"]) for s in ("train", "test")}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for name, ax in zip(("loss", "accuracy"), axes):
        for s, style in (("train", "-"), ("test", "o-")):
            if split[s]:
                ax.plot([r["epoch"] for r in split[s]], [r[name] for r in split[s]], style, label=s, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot([r["epoch"] for r in split["train"]], [r["learning_rate"] for r in split["train"]])
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path)
    plt.close(fig)
    return path
