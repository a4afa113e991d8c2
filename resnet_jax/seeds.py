"""`--seeds`: one config trained or evaluated in WORKDIR/seed_<seed> per seed, and the mean ± standard
deviation of the final validation and test accuracy in WORKDIR/seeds.json and .md (--mode eval:
seeds_eval_<tta>.json and .md, so that evaluations with different test-time augmentation sit side by side)."""

import json
import os
from typing import Dict, List

import numpy as np

from resnet_jax import workdir as workdir_lib
from resnet_jax.errors import Error

SPLITS = ("validation", "test")


def parse(text: str) -> List[int]:
    """ "3" -> [0, 1, 2]; "0,5,7" -> [0, 5, 7]."""
    try:
        seeds = [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise Error(f"--seeds={text!r} must be a count (3: seeds 0, 1, 2) or distinct seeds >= 0 (0,5,7)")
    return seeds


def seed_workdir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed_{seed}")


def final_accuracy(workdir: str) -> Dict[str, float]:
    """{"step", "validation"?, "test"}: the last evaluation a run logged in metrics.jsonl."""
    evals = [r for r in workdir_lib.read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] in SPLITS]
    if not evals:
        raise Error(f"{workdir} has no evaluation in metrics.jsonl; train it to the end first")
    step = max(r["step"] for r in evals)
    return {"step": step, **{r["split"]: r["accuracy"] for r in evals if r["step"] == step}}


def aggregate(per_seed: Dict[int, Dict[str, float]]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) over seeds, per split."""
    aggregated = {"seeds": sorted(per_seed), "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)}}
    for split in SPLITS:
        values = [r[split] for r in per_seed.values() if split in r]
        if values and len(values) == len(per_seed):
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            aggregated[split] = {"mean": float(np.mean(values)), "std": std, "n": len(values)}
    return aggregated


def table(aggregated: dict, title: str) -> str:
    """A Markdown table: one row per seed, then mean ± std, accuracies in %."""
    splits = [s for s in SPLITS if s in aggregated]
    lines = [f"# {title}", "", "| seed | step | " + " | ".join(splits) + " |", "|---" * (2 + len(splits)) + "|"]
    for seed, r in aggregated["per_seed"].items():
        lines.append(f"| {seed} | {r['step']} | " + " | ".join(f"{100 * r[s]:.2f}" for s in splits) + " |")
    lines.append(
        f"| mean ± std (n={len(aggregated['seeds'])}) | | "
        + " | ".join(f"{100 * aggregated[s]['mean']:.2f} ± {100 * aggregated[s]['std']:.2f}" for s in splits)
        + " |"
    )
    return "\n".join(lines) + "\n"


def write(workdir: str, name: str, aggregated: dict, title: str) -> str:
    """Writes WORKDIR/<name>.json and WORKDIR/<name>.md; returns the table."""
    text = table(aggregated, title)
    with open(os.path.join(workdir, f"{name}.json"), "w") as f:
        json.dump({"title": title, **aggregated}, f, indent=2)
    with open(os.path.join(workdir, f"{name}.md"), "w") as f:
        f.write(text)
    return text
