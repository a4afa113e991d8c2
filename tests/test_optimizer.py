"""The optimizer as data: each recipe's per-parameter learning rate, decay and trainable epochs,
computed from `config.param_rules`, are the ones its recipe had before the rules (pinned in
tests/fixtures/param_treatments.json, airbench's summed-loss form as the mean loss's); a rule
that names no parameter is refused; checkpoints written before the rules still evaluate,
predict and export, and refuse to resume."""

import functools
import json
import os
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from test_configs import CONFIG_NAMES, load
from test_reliability import one_line_error

from conftest import ROOT, run_cli
from resnet_jax import evaluate, optimizer, train
from resnet_jax.data import registry
from resnet_jax.errors import Error
from resnet_jax.workdir import check_and_save_config

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def param_shapes(config, num_classes=10):
    model = train.create_model(config, num_classes)
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), model.dtype))["params"]


def treatments(config):
    """{name: [peak learning rate, L2 coefficient, epochs it trains (-1: all)]} from the rules."""
    peak = optimizer.peak_learning_rate(config)
    rules = optimizer.param_rules(config, param_shapes(config, 100 if config.data.name == "cifar100" else 10))
    return {
        optimizer.param_name(path): [peak * lr, config.weight_decay * wd, -1 if epochs is None else epochs]
        for path, (lr, wd, epochs) in jax.tree_util.tree_leaves_with_path(rules, is_leaf=lambda x: isinstance(x, tuple))
    }


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_each_parameter_of_each_recipe_trains_as_it_did_before_the_rules(name):
    with open(os.path.join(FIXTURES, "param_treatments.json")) as f:
        pinned = json.load(f)
    recipe = pinned["recipes"][name]
    expected = {n: recipe["treatments"][i] for n, i in zip(pinned["parameters"][recipe["model"]], recipe["index"])}
    got = treatments(load(name))
    assert sorted(got) == sorted(expected)
    for param, (lr, l2, epochs) in expected.items():
        assert got[param] == [pytest.approx(lr, rel=1e-12), pytest.approx(l2, rel=1e-12, abs=0), epochs], param


def test_a_rule_that_names_no_parameter_and_a_parameter_no_rule_names_are_refused():
    config = load("smoke")
    params = param_shapes(config)
    config.param_rules = (("whiten/bias", 1, 1, 3),) + tuple(config.param_rules)
    with pytest.raises(Error, match=r"'whiten/bias' matches no parameter of resnet8 .*--mode summary lists them"):
        optimizer.param_rules(config, params)
    config.param_rules = ((".*/kernel", 1, 1, -1),)
    with pytest.raises(Error, match=r"no rule matches '.*/(bias|scale)'; end the rules with a catch-all"):
        optimizer.param_rules(config, params)


@pytest.mark.parametrize(
    "override,message",
    [
        ('--config.param_rules=((".*",1,1),)', "--config.param_rules: ('.*', 1, 1) is not (name regex, lr multiplier"),
        ('--config.param_rules=(("(",1,1,-1),)', "--config.param_rules: ('(', 1, 1, -1) is not (name regex"),
        ('--config.param_rules=((".*",1,-1,-1),)', "is not (name regex, lr multiplier >= 0, weight-decay multiplier"),
    ],
)
def test_malformed_rules_give_one_line_and_exit_2(tmp_path, override, message):
    result = run_cli("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"), override)
    assert message in one_line_error(result, 2)


# ------------------------------------------------- checkpoints written before the rules

# configs/smoke.py with model.num_filters=4 and ema_decay=0.9, 2 steps on CIFAR-10 images: params,
# BatchNorm statistics, their moving average and an optimizer state of the layout before param_rules.
OLD_RUN = os.path.join(FIXTURES, "smoke_run_before_param_rules")
OLD_RUN_FLAGS = ("--config", "configs/smoke.py", "--config.model.num_filters=4", "--config.ema_decay=0.9")


def old_run_config(data_dir):
    config = load("smoke")
    config.model.num_filters, config.ema_decay, config.data.data_dir = 4, 0.9, data_dir
    return config


def saved(workdir):
    """The checkpoint of step 2 as it is on disk: nested dicts of arrays, without a template."""
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as m:
        return m.restore(2, args=ocp.args.StandardRestore())


def test_a_checkpoint_from_before_the_rules_restores_for_evaluation(tiny_data_dir, tmp_path):
    workdir = str(shutil.copytree(OLD_RUN, tmp_path / "old"))
    _, setup, state = evaluate.restore(old_run_config(tiny_data_dir), workdir)
    on_disk = saved(workdir)
    assert int(state.step) == 2 and state.ema is not None
    for part in ("params", "batch_stats", "ema"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(state, part), on_disk[part])
    # Its optimizer state is not the one this optimizer keeps: a whole-state restore could not read it.
    fresh = flax.serialization.to_state_dict(setup.fresh_state)["opt_state"]
    assert jax.tree_util.tree_structure(fresh) != jax.tree_util.tree_structure(on_disk["opt_state"])
    assert not np.array_equal(on_disk["params"]["conv_init"]["kernel"], setup.fresh_state.params["conv_init"]["kernel"])


@pytest.mark.slow
def test_a_checkpoint_from_before_the_rules_evaluates_predicts_and_exports_through_run_py(tiny_data_dir, tmp_path):
    workdir = str(shutil.copytree(OLD_RUN, tmp_path / "old"))
    common = (*OLD_RUN_FLAGS, "--workdir", workdir, f"--config.data.data_dir={tiny_data_dir}")
    result = run_cli(*common, "--mode", "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval: step 2: test accuracy" in result.stdout and "weight average" in result.stdout
    dataset = registry.load_dataset(old_run_config(tiny_data_dir).data)
    image = str(tmp_path / "image.png")
    Image.fromarray(dataset.test_images[0]).save(image)
    result = run_cli(*common, "--mode", "predict", "--json", image)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[0])["file"] == image
    result = run_cli(*common, "--mode", "export", "--config.export_formats=stablehlo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(os.path.join(workdir, "export", "model.stablehlo"))


@pytest.mark.parametrize("form", ["standard", "airbench"])
def test_training_on_from_a_run_before_the_rules_is_refused_in_one_line(tmp_path, form):
    workdir = shutil.copytree(OLD_RUN, tmp_path / "old")
    if form == "airbench":  # an airbench run: its config.json says its loss was summed
        with open(workdir / "config.json") as f:
            config = json.load(f)
        config["hyperparameter_form"], config["model"]["name"] = "airbench", "airbench93"
        with open(workdir / "config.json", "w") as f:
            json.dump(config, f)
    why = {
        "standard": "its optimizer state is laid out as before config.param_rules",
        "airbench": "its momentum is of airbench's summed loss, this optimizer's of the mean loss",
    }[form]
    with pytest.raises(Error, match=f"holds a run that cannot resume here: {why}; train in another --workdir"):
        check_and_save_config(str(workdir), old_run_config(None))
    result = run_cli(*OLD_RUN_FLAGS, "--workdir", str(workdir), "--config.allow_config_change=True")
    line = one_line_error(result, 2)
    assert why in line and "--mode eval, predict and export still read its checkpoints" in line, line
