"""Results over seeds: --seeds trains or evaluates one workdir per seed and summarises them."""

import json

import numpy as np
import pytest

from conftest import run_cli
from resnet_jax import seeds, tfds_writer
from resnet_jax.errors import Error
from resnet_jax.workdir import read_metrics


def test_seed_lists_and_their_errors():
    assert seeds.parse("3") == [0, 1, 2]
    assert seeds.parse("0,5,7") == [0, 5, 7]
    for bad in ("0", "a", "1,1", "-1,2", ""):
        with pytest.raises(Error, match="must be a count"):
            seeds.parse(bad)


def test_the_aggregate_is_mean_and_sample_standard_deviation():
    per_seed = {
        0: {"step": 9, "test": 0.70, "validation": 0.60},
        1: {"step": 9, "test": 0.74, "validation": 0.64},
        2: {"step": 9, "test": 0.78, "validation": 0.62},
    }
    aggregated = seeds.aggregate(per_seed)
    assert aggregated["test"] == {"mean": pytest.approx(0.74), "std": pytest.approx(0.04), "n": 3}
    assert aggregated["validation"]["std"] == pytest.approx(np.std([0.60, 0.64, 0.62], ddof=1))
    text = seeds.table(aggregated, "t")
    assert "| 1 | 9 | 64.00 | 74.00 |" in text and "| mean ± std (n=3) | | 62.00 ± 2.00 | 74.00 ± 4.00 |" in text
    # One seed: no spread to report; a split some seeds lack is left out.
    assert seeds.aggregate({0: {"step": 1, "test": 0.5}})["test"]["std"] == 0.0
    assert "validation" not in seeds.aggregate(
        {0: {"step": 1, "test": 0.5, "validation": 0.4}, 1: {"step": 1, "test": 0.6}}
    )


@pytest.mark.slow
def test_seeds_train_then_evaluate_with_tta_on_cifar100(tmp_path):
    """configs/cifar100.py, shrunk to a resnet8 and 6 steps, on synthetic CIFAR-100 (fine and coarse
    labels), over two seeds with a validation split; then --mode eval of both with flip TTA."""
    data_dir = str(tmp_path / "data")
    tfds_writer.main([data_dir, "--synthetic", "--name", "cifar100", "--train", "500", "--test", "200"])
    workdir = tmp_path / "run"
    args = (
        "--config",
        "configs/cifar100.py",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        "--config.model.name=resnet8",
        "--config.model.num_filters=8",
        "--config.batch_size=64",
        "--config.eval_batch_size=200",
        "--config.num_train_steps=6",
        "--config.log_every_steps=3",
        "--config.data.validation_examples=100",
        "--seeds",
        "0,3",
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training resnet8 on cifar100: 6 steps (6 per epoch), 8 devices on 1 processes" in result.stderr
    summary = json.load(open(workdir / "seeds.json"))
    assert summary["seeds"] == [0, 3] and summary["test"]["n"] == 2 and summary["validation"]["n"] == 2
    for seed in (0, 3):
        assert json.load(open(workdir / f"seed_{seed}" / "config.json"))["seed"] == seed
        assert summary["per_seed"][str(seed)]["step"] == 6
        losses = [r["loss"] for r in read_metrics(str(workdir / f"seed_{seed}" / "metrics.jsonl"))]
        assert len(losses) == 4 and np.all(np.isfinite(losses))  # train at 3 and 6, validation and test at 6
    losses = [[r["loss"] for r in read_metrics(str(workdir / f"seed_{seed}" / "metrics.jsonl"))] for seed in (0, 3)]
    assert losses[0] != losses[1]  # different seeds, different runs
    assert "mean ± std (n=2)" in result.stdout and (workdir / "seeds.md").read_text() in result.stdout

    # Training again resumes each finished run (nothing retrained) and gives the same summary.
    again = run_cli(*args)
    assert again.returncode == 0 and json.load(open(workdir / "seeds.json")) == summary

    result = run_cli(*args, "--mode", "eval", "--config.eval_tta=flip")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.load(open(workdir / "seeds_eval_flip.json"))
    assert evaluated["seeds"] == [0, 3] and "tta flip" in evaluated["title"]
    for seed in ("0", "3"):
        report = json.load(open(workdir / f"seed_{seed}" / "eval_6.json"))
        assert report["tta"] == "flip" and evaluated["per_seed"][seed]["test"] == report["accuracy"]
        assert report["class_names"] == [f"class_{i}" for i in range(100)]  # the fine labels, not the 20 coarse ones
        confusion = np.array(report["confusion_matrix"])
        assert confusion.shape == (100, 100) and confusion.sum() == report["num_examples"] == 200
        assert (confusion.sum(1) == 2).all()  # the writer's balanced classes: 2 test images each
        assert report["validation"]["num_examples"] == 100

    result = run_cli(*args, "--mode", "export")
    assert result.returncode == 2 and "--seeds works with --mode train or eval" in result.stderr
