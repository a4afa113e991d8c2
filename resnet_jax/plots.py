"""Plots of a run, drawn with matplotlib's headless backend. `python -m resnet_jax.plots WORKDIR`
redraws WORKDIR/curves.png, also while the run goes on."""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from resnet_jax.errors import Error  # noqa: E402
from resnet_jax.workdir import read_metrics  # noqa: E402


def plot_confusion(confusion, class_names, path: str, title: str = "") -> None:
    """A labelled confusion matrix: rows are true classes, columns predictions."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true")
    if n <= 20:
        threshold = confusion.max() / 2
        for i, j in np.ndindex(n, n):
            color = "white" if confusion[i, j] > threshold else "black"
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(workdir: str) -> str:
    """Draws workdir/curves.png from workdir/metrics.jsonl: loss, accuracy and learning rate
    against epoch, train and test. Returns the path written."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    records = read_metrics(metrics)
    if not records:
        raise Error(f"no metrics in {metrics}: not a run's --workdir, or the run has not logged yet")
    split = {s: sorted((r for r in records if r["split"] == s), key=lambda r: r["step"]) for s in ("train", "test")}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for name, ax in zip(("loss", "accuracy"), axes):
        for s in ("train", "test"):
            if split[s]:
                # Test points are few, so marked; so is a lone train point, which a line would not show.
                marker = "o" if s == "test" or len(split[s]) == 1 else None
                epochs, values = [r["epoch"] for r in split[s]], [r[name] for r in split[s]]
                ax.plot(epochs, values, marker=marker, markersize=3, label=s)
        ax.legend()
    axes[2].plot([r["epoch"] for r in split["train"]], [r["learning_rate"] for r in split["train"]])
    for title, ax in zip(("loss", "accuracy", "learning rate"), axes):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    # Written aside then renamed: a viewer, or the run and this module's command drawing at
    # the same time, never see a half-written file.
    partial = f"{path}.{os.getpid()}.tmp"
    fig.savefig(partial, format="png")
    plt.close(fig)
    os.replace(partial, path)
    return path


def main(argv=None) -> int:
    """`python -m resnet_jax.plots WORKDIR`: redraws a run's curves; 0 on success, 2 on an error."""
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.plots", description="Redraws WORKDIR/curves.png from WORKDIR/metrics.jsonl."
    )
    parser.add_argument("workdir", help="a run's --workdir (finished or still running)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot_curves(args.workdir)}")
    except (Error, OSError) as e:  # OSError: an unwritable workdir, an unreadable metrics.jsonl.
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, Error) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
