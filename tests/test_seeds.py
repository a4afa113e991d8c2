"""Results over seeds: --seeds trains or evaluates one workdir per seed and summarises them."""

import json
import os

import numpy as np
import pytest

from conftest import run_cli
from resnet_jax import seeds
from resnet_jax.errors import Error


def test_seed_lists_and_their_errors():
    assert seeds.parse("3") == [0, 1, 2]
    assert seeds.parse("0,5,7") == [0, 5, 7]
    for bad in ("0", "a", "1,1", "-1,2", ""):
        with pytest.raises(Error, match="must be a count"):
            seeds.parse(bad)


def test_summary_is_mean_and_sample_standard_deviation():
    per_seed = {0: {"step": 9, "test": 0.70, "validation": 0.60}, 1: {"step": 9, "test": 0.74, "validation": 0.64},
                2: {"step": 9, "test": 0.78, "validation": 0.62}}
    summary = seeds.summarize(per_seed)
    assert summary["test"] == {"mean": pytest.approx(0.74), "std": pytest.approx(0.04), "n": 3}
    assert summary["validation"]["std"] == pytest.approx(np.std([0.60, 0.64, 0.62], ddof=1))
    text = seeds.table(summary, "t")
    assert "| 1 | 9 | 64.00 | 74.00 |" in text and "| mean ± std (n=3) | | 62.00 ± 2.00 | 74.00 ± 4.00 |" in text
    # One seed: no spread to report; a split some seeds lack is left out.
    assert seeds.summarize({0: {"step": 1, "test": 0.5}})["test"]["std"] == 0.0
    assert "validation" not in seeds.summarize({0: {"step": 1, "test": 0.5, "validation": 0.4}, 1: {"step": 1, "test": 0.6}})


@pytest.mark.slow
def test_seeds_train_then_evaluate_with_tta(tiny_data_dir, tmp_path):
    args = ("--config", "configs/smoke.py", "--workdir", str(tmp_path), f"--config.data.data_dir={tiny_data_dir}",
            "--config.num_train_steps=6", "--config.log_every_steps=3", "--config.data.validation_examples=100",
            "--seeds", "0,3")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(tmp_path / "seeds.json"))
    assert summary["seeds"] == [0, 3] and summary["test"]["n"] == 2 and summary["validation"]["n"] == 2
    for seed in (0, 3):
        assert json.load(open(tmp_path / f"seed_{seed}" / "config.json"))["seed"] == seed
        assert summary["per_seed"][str(seed)]["step"] == 6
    # Different seeds, different runs.
    assert summary["per_seed"]["0"]["test"] != summary["per_seed"]["3"]["test"] or \
        summary["per_seed"]["0"]["validation"] != summary["per_seed"]["3"]["validation"]
    assert "mean ± std (n=2)" in result.stdout and (tmp_path / "seeds.md").read_text() in result.stdout

    # Training again resumes each finished run (nothing retrained) and gives the same summary.
    again = run_cli(*args)
    assert again.returncode == 0 and json.load(open(tmp_path / "seeds.json")) == summary

    result = run_cli(*args, "--mode", "eval", "--config.eval_tta=flip")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.load(open(tmp_path / "seeds_eval_flip.json"))
    assert evaluated["seeds"] == [0, 3] and "tta flip" in evaluated["title"]
    for seed in ("0", "3"):
        report = json.load(open(tmp_path / f"seed_{seed}" / "eval_6.json"))
        assert report["tta"] == "flip" and evaluated["per_seed"][seed]["test"] == report["accuracy"]

    result = run_cli(*args, "--mode", "export")
    assert result.returncode == 2 and "--seeds works with --mode train or eval" in result.stderr
