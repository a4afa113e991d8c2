"""Train or evaluate a ResNet on CIFAR.

    python run.py --config configs/resnet18.py [--workdir DIR] [--mode train|eval|export|summary]
                  [--config.key=value ...]
    python run.py --config configs/resnet18.py --seeds 3 [--mode eval]   # mean ± std over seeds
    python run.py --config configs/resnet18.py --mode predict [--json] IMAGE [IMAGE ...]
                  [--coordinator_address HOST:PORT --num_processes N --process_id I]  # multi-host; not
                  needed under srun, mpirun, a Kubernetes Indexed Job or on a Cloud TPU pod

Bad input ends in one line on stderr and exit code 2; a failure during the run in
exit code 1; success and a clean stop on SIGTERM/SIGINT in exit code 0. RESNET_JAX_DEBUG=1
shows every error with its Python traceback instead (for bug reports).
"""

import importlib.machinery
import importlib.util
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax import cluster, xla_flags
from resnet_jax.errors import Error, RunFailure

xla_flags.set_compilation_cache()  # Before anything imports jax.


def _load_source(module_name: str, module_path: str):
    """ml_collections' `_load_source` on exec_module(). Its own calls SourceFileLoader.load_module(),
    deprecated and removed in Python 3.15, so every run warns. Drop when ml_collections loads
    config files with exec_module()."""
    loader = importlib.machinery.SourceFileLoader(module_name, module_path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader))
    sys.modules[module_name] = module  # as load_module() did
    loader.exec_module(module)
    return module


if hasattr(config_flags.config_flags, "_load_source"):
    config_flags.config_flags._load_source = _load_source

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go. Default: runs/<config file stem>.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "predict", "export", "summary"],
    "train (resuming if the workdir has checkpoints), eval (a checkpoint on the test split), "
    "predict (IMAGE files with a checkpoint), export (a checkpoint as StableHLO and a "
    "SavedModel in WORKDIR/export/) or summary (the model's table).",
)
flags.DEFINE_bool("json", False, "--mode predict: one JSON line per image.")
flags.DEFINE_string(
    "seeds",
    None,
    "--mode train or eval once per seed, in WORKDIR/seed_<seed>, then the mean and standard deviation "
    "of the final accuracies in WORKDIR/seeds*.json and .md: a count (3: seeds 0, 1, 2) or a list (0,5,7).",
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_integer(
    "heartbeat_timeout",
    60,
    "Multi-host: seconds without a heartbeat after which jax's coordinator counts a process as lost "
    "and ends the others (jax's default is 100).",
)


def parse_flags(argv):
    """absl's parser, with flag mistakes (unknown keys, wrong types, bad files) as one line and exit 2."""
    try:
        argv = FLAGS(argv)
        FLAGS.config.keys()  # The config file loads lazily: make its errors flag errors too.
        return argv
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field.
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
            e = e.args[0]
        lines = str(e.args[0] if e.args else e).splitlines()
        hint = " ".join(lines[1:]) or "configs/default.py lists every field"
        message = f"unknown config field {lines[0]} in a --config.* override ({hint})"
    except OSError as e:  # The config file is missing.
        message = f"cannot load the --config file: {str(e).strip().splitlines()[-1].strip()}"
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file that raised: its traceback's last line says why.
        message = f"{lines[0]} {lines[-1]}" if len(lines) > 1 else lines[0]
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Keeps our log lines and the libraries' errors; drops orbax/tfds/jax chatter."""
    ours = record.pathname.startswith(os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet_jax"))
    return ours or record.levelno >= logging.ERROR


def main(argv):
    if os.environ.get("RESNET_JAX_DEBUG") == "1":  # For bug reports: every error with its traceback.
        return run(argv)
    try:
        run(argv)
    except Exception as e:
        failure = e if isinstance(e, Error) else cluster.lost_process(e)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr, flush=True)
        if isinstance(failure, RunFailure):
            sys.stdout.flush()
            # orbax's threads that wait on a failed save, and jax's shutdown barrier with a lost
            # process, never finish: leave without joining them.
            os._exit(failure.exit_code)
        sys.exit(failure.exit_code)


def run(argv) -> None:
    if len(argv) > 1 and FLAGS.mode != "predict":
        raise Error(f"unexpected arguments: {' '.join(argv[1:])} (only --mode predict takes IMAGE files)")
    if FLAGS.config is None:
        raise Error("--config is required, for example --config configs/resnet18.py")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").addFilter(_quiet_libraries)  # orbax and tfds log through absl
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)

    cpu_path = xla_flags.set_cpu_defaults(FLAGS.config.model.dtype)  # Before jax starts its backend.
    joined = cluster.join(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.heartbeat_timeout)
    import jax

    from resnet_jax import accelerators, config_checks

    config = FLAGS.config
    config_checks.validate(config, jax.device_count())  # Bad input: one line on stderr, nothing before it.
    accelerators.log_platform(cpu_path)
    cluster.log_joined(joined)
    config_path = config_flags.get_config_filename(FLAGS["config"])
    workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])

    if FLAGS.seeds is not None:
        run_seeds(config, workdir, config_path)
    else:
        MODES[FLAGS.mode](config, workdir, config_path, argv[1:])


# ------------------------------------------------------------------ the modes
# Each takes (config, workdir, config_path, the IMAGE arguments) and prints its own report. The
# modules are imported inside them: jax must not be imported before the XLA flags are set.


def train_mode(config, workdir: str, config_path: str, images) -> None:
    train_workdir(config, workdir, config_path)


def eval_mode(config, workdir: str, config_path: str, images) -> None:
    from resnet_jax import evaluate

    evaluate.print_report(evaluate.evaluate_checkpoint(config, workdir), workdir)


def predict_mode(config, workdir: str, config_path: str, images) -> None:
    from resnet_jax import predict

    if not images:
        raise Error("--mode predict needs IMAGE files: python run.py --config ... --mode predict a.png b.jpg")
    failures = predict.predict_files(config, workdir, images, as_json=FLAGS.json)
    sys.exit(1 if failures else 0)


def export_mode(config, workdir: str, config_path: str, images) -> None:
    from resnet_jax import export

    export.print_report(export.export_checkpoint(config, workdir), workdir)


def summary_mode(config, workdir: str, config_path: str, images) -> None:
    from resnet_jax import summary

    print(summary.model_table(config))


MODES = {
    "train": train_mode,
    "eval": eval_mode,
    "predict": predict_mode,
    "export": export_mode,
    "summary": summary_mode,
}


def train_workdir(config, workdir: str, config_path: str, dataset=None) -> bool:
    """Trains in `workdir` under its lock (on `dataset`, or the one the config names); whether
    training reached its last step."""
    import jax

    from resnet_jax import loop, workdir as workdir_lib

    workdir_lib.prepare(workdir)
    main_process = jax.process_index() == 0
    lock = workdir_lib.Lock(workdir) if main_process else None
    if lock:
        lock.acquire()
    try:
        if main_process:
            workdir_lib.check_and_save_config(workdir, config)
        return loop.train_and_evaluate(config, workdir, dataset, config_path=config_path)
    finally:
        if lock:
            lock.release()


def run_seeds(config, workdir: str, config_path: str) -> None:
    """--seeds: trains or evaluates WORKDIR/seed_<seed> for each seed, then aggregates them."""
    import jax

    from resnet_jax import evaluate, seeds
    from resnet_jax.data import registry

    if FLAGS.mode not in ("train", "eval"):
        raise Error(f"--seeds works with --mode train or eval, not --mode {FLAGS.mode}")
    seed_list = seeds.parse(FLAGS.seeds)
    dataset = registry.load_dataset(config.data)  # Once: the seeds differ in nothing the data depends on.
    per_seed = {}
    for seed in seed_list:
        seed_config = config.copy_and_resolve_references()
        seed_config.seed = seed
        directory = seeds.seed_workdir(workdir, seed)
        if FLAGS.mode == "eval":
            report = evaluate.evaluate_checkpoint(seed_config, directory, dataset)
            per_seed[seed] = {"step": report["step"], "test": report["accuracy"]}
            if "validation" in report:
                per_seed[seed]["validation"] = report["validation"]["accuracy"]
        elif train_workdir(seed_config, directory, config_path, dataset):
            per_seed[seed] = seeds.final_accuracy(directory)
        else:  # Stopped by a signal: the same command resumes it.
            return
    if jax.process_index() == 0:
        name = "seeds" if FLAGS.mode == "train" else f"seeds_eval_{config.eval_tta}"
        what = (
            "final evaluation" if FLAGS.mode == "train" else f"--mode eval of checkpoint {config.eval_checkpoint_step}"
        )
        weights = ", weight average" if config.ema_decay > 0 else ""
        title = f"{os.path.basename(config_path)} over {len(per_seed)} seeds: {what} (tta {config.eval_tta}{weights})"
        print(seeds.write(workdir, name, seeds.aggregate(per_seed), title), end="")
        print(f"wrote {os.path.join(workdir, name)}.json and .md")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
