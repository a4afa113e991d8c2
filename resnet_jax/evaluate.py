"""`--mode eval`: restore a checkpoint with orbax and evaluate the whole test (and validation) split."""

import json
import logging
import os

import jax

from resnet_jax import checkpoints, loop, plots, train, workdir as workdir_lib
from resnet_jax.data import registry

FIGURES = ("num_examples", "loss", "accuracy")  # of each split in the report


def restore(config, workdir: str, dataset=None):
    """(dataset, setup, state): the checkpoint `config.eval_checkpoint_step` names in `workdir`, on the
    host, with the data set and model it was trained with; what eval, predict and export start from."""
    workdir_lib.check_config(workdir, config)
    dataset = dataset or registry.load_dataset(config.data)
    setup = train.Setup(config, dataset)
    manager = checkpoints.create_manager(workdir, config.keep_checkpoints, read_only=True)
    state = checkpoints.restore_for_eval(manager, setup.fresh_state, str(config.eval_checkpoint_step))
    logging.info("restored the checkpoint at step %d in %s", int(state.step), manager.directory)
    return dataset, setup, state


def evaluate_checkpoint(config, workdir: str, dataset=None) -> dict:
    """Evaluates the checkpoint on the test split (and the validation split, when the run holds one out);
    writes eval_<step>.json and confusion_<step>.png to `workdir` and returns the report: the test
    figures at its top level, the validation ones under "validation"."""
    dataset, setup, state = restore(config, workdir, dataset)
    step = int(state.step)
    p_eval_step, replicated = setup.parallel_eval_step(), setup.layout.replicate(state)
    results = {
        split: loop.evaluate_split(setup, p_eval_step, replicated, images, labels)
        for split, images, labels in dataset.eval_splits()
    }
    result = results["test"]
    confusion = result["confusion"]
    per_class = confusion.diagonal() / confusion.sum(1).clip(min=1)
    report = {
        "step": step,
        "split": "test",
        **{k: result[k] for k in FIGURES},
        "tta": config.eval_tta,
        "ema": state.ema is not None,
        "per_class_accuracy": {name: float(a) for name, a in zip(dataset.class_names, per_class)},
        "class_names": list(dataset.class_names),
        "confusion_matrix": confusion.tolist(),
    }
    if "validation" in results:
        report["validation"] = {k: results["validation"][k] for k in FIGURES}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
            json.dump(report, f, indent=2)
        plots.plot_confusion(
            confusion,
            dataset.class_names,
            os.path.join(workdir, f"confusion_{step}.png"),
            title=f"{config.model.name} step {step}: accuracy {result['accuracy']:.2%}",
        )
    return report


def print_report(report: dict, workdir: str) -> None:
    """`--mode eval`'s lines: each split's accuracy and loss, then the file written."""
    for split, result in (("validation", report.get("validation")), ("test", report)):
        if result:
            print(
                f"eval: step {report['step']}: {split} accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} on "
                f"{result['num_examples']} examples (tta {report['tta']}{', weight average' if report['ema'] else ''})"
            )
    print(f"eval: wrote {workdir}/eval_{report['step']}.json")
