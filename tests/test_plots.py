"""Training curves: plot_curves and `python -m resnet_jax.plots WORKDIR`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_predict import smoke_run_workdir

from conftest import ROOT
from resnet_jax import plots
from resnet_jax.errors import Error

CURVES_SIZE = (1200, 360)  # plot_curves's figsize (12, 3.6) inches at 100 dpi


def train_record(step):
    return {
        "step": step,
        "epoch": step / 10,
        "split": "train",
        "loss": 2.3 - step / 100,
        "accuracy": step / 100,
        "learning_rate": 0.1,
        "images_per_sec": 100.0,
    }


def eval_record(step):
    return {"step": step, "epoch": step / 10, "split": "test", "loss": 2.2 - step / 100, "accuracy": step / 120}


def write_metrics(workdir, records, tail=""):
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


def plots_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "resnet_jax.plots", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def assert_curves_png(workdir):
    with Image.open(os.path.join(workdir, "curves.png")) as image:
        assert image.format == "PNG" and image.size == CURVES_SIZE
        image.load()


# How wide (in pixels) the drawn data must span in a panel of curves.png: a curve runs across most
# of its axes (about 300 px of the panel's 400); a lone point is a marker apart from its legend
# entry. A legend entry's line sample alone spans 28 px, so a figure with legends but no data fails.
CURVE, POINT = 200, 60


def coloured_spans(workdir):
    """How many pixel columns the coloured pixels of each panel (loss, accuracy, learning rate)
    of curves.png span, from the leftmost to the rightmost: the curves, markers and legend
    samples. Everything else matplotlib draws (axes, text, grid, legend frame) is grey."""
    with Image.open(os.path.join(workdir, "curves.png")) as image:
        pixels = np.asarray(image.convert("RGB"), np.int32)
    coloured = pixels.max(-1) - pixels.min(-1) > 60
    spans = []
    for panel in np.split(coloured, 3, axis=1):  # three subplots side by side, a third of the width each
        columns = np.flatnonzero(panel.any(0))
        spans.append(columns.max() - columns.min() + 1 if len(columns) else 0)
    return spans


def test_curves_are_a_png_of_the_figure_size(tmp_path):
    write_metrics(tmp_path, [train_record(s) for s in (5, 10, 15, 20)] + [eval_record(10), eval_record(20)])
    assert plots.plot_curves(str(tmp_path)) == str(tmp_path / "curves.png")
    assert_curves_png(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.jsonl"]  # no temporary file left behind
    loss, accuracy, learning_rate = coloured_spans(tmp_path)
    assert min(loss, accuracy, learning_rate) > CURVE, (loss, accuracy, learning_rate)


@pytest.mark.parametrize(
    "records,span",
    [
        ([train_record(5)], POINT),  # a lone train point is marked
        ([train_record(5), train_record(10)], CURVE),
        ([eval_record(10)], POINT),  # test points are marked
    ],
)
def test_a_run_without_test_or_train_records_yet_is_drawn(tmp_path, records, span):
    write_metrics(tmp_path, records, tail='{"step": 15, "epoch": 1.5, "spl')  # a torn last line
    plots.plot_curves(str(tmp_path))
    assert_curves_png(tmp_path)
    loss, accuracy, learning_rate = coloured_spans(tmp_path)
    assert min(loss, accuracy) > span, (loss, accuracy)
    if len(records) > 1:  # the learning rate of two train records is a line (of one, nothing shows)
        assert learning_rate > CURVE, learning_rate


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(Error, match="no metrics in"):
        plots.plot_curves(str(tmp_path))
    write_metrics(tmp_path, [])
    result = plots_main(tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: no metrics in {tmp_path / 'metrics.jsonl'}: not a run's --workdir, "
        f"or the run has not logged yet"
    )
    assert not os.path.exists(tmp_path / "curves.png")


@pytest.mark.slow
def test_main_redraws_a_finished_runs_curves(tiny_data_dir, tmp_path_factory):
    workdir = smoke_run_workdir(tiny_data_dir, tmp_path_factory)
    os.remove(os.path.join(workdir, "curves.png"))
    result = plots_main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {os.path.join(workdir, 'curves.png')}"
    assert_curves_png(workdir)
    assert min(coloured_spans(workdir)) > CURVE
