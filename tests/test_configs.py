"""Config files load and validate; the CLI rejects bad flags with one line and exit code 2."""

import glob
import importlib
import os

import pytest

from conftest import ROOT, run_cli
from resnet_jax import config_checks, optimizer, train

CONFIG_NAMES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_the_configs_the_readme_promises_exist():
    assert {
        "default",
        "resnet18",
        "resnet20",
        "resnet56",
        "resnet110",
        "smoke",
        "tutorial",
        "resnet9_fast",
        "cifar100",
        "resnet18_mix",
    } <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_loads_and_validates(name):
    config = load(name)
    config_checks.validate(config, device_count=1)
    if config.batch_size % 8 == 0:
        config_checks.validate(config, device_count=8)


def test_flagship_and_he_recipes():
    r18 = load("resnet18")
    assert (r18.model.name, r18.model.stem, r18.batch_size, r18.nesterov) == ("resnet18", "cifar", 512, True)
    assert optimizer.peak_learning_rate(r18) == pytest.approx(0.2)
    assert (r18.weight_decay, r18.label_smoothing, r18.schedule) == (5e-4, 0.1, "cosine")
    for name in ("resnet20", "resnet56", "resnet110"):
        he = load(name)
        assert (he.batch_size, he.weight_decay, he.num_epochs) == (128, 1e-4, 164)
        assert optimizer.peak_learning_rate(he) == 0.1
        schedule = optimizer.create_learning_rate_fn(he, steps_per_epoch=100, num_steps=16400)
        assert [float(schedule(s)) for s in (0, 8199, 8200, 12299, 12300)] == pytest.approx(
            [0.1, 0.1, 0.01, 0.01, 0.001]
        )
    tutorial = load("tutorial")
    assert (tutorial.model.stem, tutorial.batch_size, tutorial.learning_rate, tutorial.data.augment) == (
        "imagenet",
        4,
        0.001,
        False,
    )


def test_page_resnet9_and_cifar100_recipes():
    fast = load("resnet9_fast")
    assert (fast.model.name, fast.batch_size, fast.num_epochs, fast.nesterov, fast.data.cutout) == (
        "resnet9",
        512,
        24,
        True,
        8,
    )
    assert (fast.weight_decay, fast.label_smoothing, fast.ema_decay, fast.eval_tta) == (
        5e-4,
        0.2,
        0.99,
        "flip_translate",
    )
    # CIFAR-10's 50,000 images at batch 512: 97 steps an epoch, 2,328 in all; lr 0 -> 0.4 at epoch 5 -> 0.
    schedule = optimizer.create_learning_rate_fn(fast, steps_per_epoch=97, num_steps=2328)
    assert [float(schedule(s)) for s in (0, 485, 2328)] == pytest.approx([0.0, 0.4, 0.0], abs=1e-6)
    cifar100, r18 = load("cifar100"), load("resnet18")
    assert cifar100.data.name == "cifar100"
    cifar100.data.name = "cifar10"
    assert cifar100 == r18  # otherwise the flagship recipe


def test_resnet18_mix_is_the_flagship_recipe_plus_cutmix():
    mix, r18 = load("resnet18_mix"), load("resnet18")
    assert (mix.cutmix_alpha, mix.mixup_alpha, mix.num_epochs) == (1.0, 0.0, 300)
    assert train.mixes(mix) and not train.mixes(r18)
    mix.cutmix_alpha, mix.num_epochs = r18.cutmix_alpha, r18.num_epochs
    assert mix == r18  # otherwise the flagship recipe


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.model.name=resnet19", "model.name='resnet19' is not one of: airbench93, airbench94, resnet101"),
        ("--config.data.name=mnist", "data.name='mnist' is not one of: cifar10, cifar100"),
        ("--config.model.dtype=float16", "model.dtype='float16' is not one of: float32, bfloat16"),
        ("--config.batch_size=0", "batch_size must be positive"),
        ("--config.learning_rate=-0.1", "learning_rate must be positive"),
        ("--config.num_epochs=0", "num_epochs must be positive"),
        ("--config.batch_size=100", "batch_size=100 is not divisible by the 8 devices"),
        ("--config.eval_batch_size=12", "eval_batch_size=12 is not divisible by the 8 devices"),
        ("--config.schedule=linear", "schedule='linear' is not one of"),
        ("--config.eval_checkpoint_step=last", "eval_checkpoint_step must be 'latest', 'best' or a step"),
        ("--config.eval_tta=mirror", "eval_tta='mirror' is not one of: none, flip, flip_translate"),
        ("--config.ema_decay=1.0", "ema_decay must be in [0, 1)"),
        ("--config.data.validation_examples=-1", "data.validation_examples must be >= 0"),
        ("--config.data.padding_mode=wrap", "data.padding_mode='wrap' is not one of: reflect, zero"),
        ("--config.parallel=jit", "parallel='jit' is not one of: pmap, sharded"),
        ("--config.mixup_alpha=-0.2", "mixup_alpha and cutmix_alpha must be >= 0 (0: off), got -0.2, 0.0"),
        ("--config.cutmix_alpha=-1.0", "mixup_alpha and cutmix_alpha must be >= 0 (0: off), got 0.0, -1.0"),
    ],
)
def test_invalid_values_are_rejected_before_anything_runs(tmp_path, override, message):
    result = run_cli("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"), override)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
    assert not (tmp_path / "w").exists()  # nothing created


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.unknown=1"], "unknown config field 'unknown'"),
        (["--config.batch_sise=8"], 'Did you mean "batch_size"'),
        (["--config.batch_size=abc"], "--config.batch_size=abc"),
        (["--mode=fly"], "--mode=fly: value should be one of"),
        (["--config", "configs/missing.py"], "No such file or directory: 'configs/missing.py'"),
        (["stray_argument"], "unexpected arguments: stray_argument"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tmp_path, args, message):
    if "--config" not in args:
        args = ["--config", "configs/smoke.py", *args]
    result = run_cli(*args, "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0


def test_a_config_file_that_raises_is_reported(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    raise ValueError('boom in config')\n")
    result = run_cli("--config", str(bad))
    assert result.returncode == 2
    assert "ValueError: boom in config" in result.stderr and "Traceback" not in result.stderr


def test_resnet_jax_debug_shows_the_traceback(tmp_path):
    result = run_cli(
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(tmp_path / "w"),
        "--config.batch_size=0",
        env={"RESNET_JAX_DEBUG": "1"},
    )
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "resnet_jax.errors.Error: --config.batch_size must be positive" in result.stderr


def test_loading_a_config_file_raises_no_deprecation_warning():
    """ml_collections' own loader calls the deprecated load_module() (removed in Python 3.15);
    run.py's replacement must keep --config working with DeprecationWarning as an error."""
    import subprocess
    import sys

    command = ["run.py", "--config", "configs/smoke.py", "--mode", "summary"]
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, (
        "ml_collections' config loader changed (run.py's _load_source replaces its private "
        "config_flags._load_source: adapt or drop it): " + done.stderr[-2000:]
    )
    assert "resnet8 for cifar10" in done.stdout
