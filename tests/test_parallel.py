"""The two device layouts, "pmap" and "sharded" (jax.jit of shard_map over a mesh), train and
evaluate the same, step by step, on 8 devices: with and without sync BatchNorm, with the
weight average. Whole runs under both, resumed across them, are in test_loop.py; two processes
in test_train.py."""

import chex
import jax
import numpy as np
import pytest
from test_train import run_steps, synthetic_dataset

from configs import smoke
from resnet_jax import loop, parallel, train

pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset()


def config_for(layout, sync_batch_norm=True):
    config = smoke.get_config()
    config.parallel, config.model.sync_batch_norm, config.ema_decay = layout, sync_batch_norm, 0.9
    return config


@pytest.mark.parametrize("sync_batch_norm", [True, False])
def test_sharded_trains_as_pmap_does_on_8_devices(dataset, sync_batch_norm):
    pmap = run_steps(config_for("pmap", sync_batch_norm), dataset, 8)
    sharded = run_steps(config_for("sharded", sync_batch_norm), dataset, 8)
    for name in ("params", "batch_stats", "opt_state", "ema", "train_metrics"):
        chex.assert_trees_all_close(getattr(sharded, name), getattr(pmap, name), rtol=1e-4, atol=1e-5)
    assert int(sharded.step) == int(pmap.step) == 3
    # Something was learned: the params moved well beyond that tolerance.
    start = train.Setup(config_for("pmap"), dataset).fresh_state.params
    moved = [
        np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(sharded.params), jax.tree_util.tree_leaves(start))
    ]
    assert max(moved) > 1e-2


def test_sharded_state_is_one_replicated_global_array_and_the_step_compiles_once(dataset):
    setup = train.Setup(config_for("sharded"), dataset)
    state = setup.layout.replicate(setup.fresh_state)
    kernel = state.params["conv_init"]["kernel"]
    assert kernel.shape == setup.fresh_state.params["conv_init"]["kernel"].shape  # no stacked copies
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
    p_train_step = setup.parallel_train_step()
    for batch in setup.train_batches(0, 3):
        assert batch["image"].shape[0] == setup.config.batch_size  # one global batch, split on the axis
        assert batch["image"].sharding.spec == jax.sharding.PartitionSpec(parallel.AXIS)
        state = p_train_step(state, batch)
    state = state.replace(train_metrics=setup.layout.replicate(train.empty_train_metrics()))
    p_train_step(state, next(setup.train_batches(3, 4)))
    assert p_train_step._cache_size() == 1  # the state's layout in is the layout out: no second compilation


def test_both_layouts_evaluate_the_same(dataset):
    reports = {}
    for layout in parallel.LAYOUTS:
        setup = train.Setup(config_for(layout), dataset)
        state = setup.layout.replicate(setup.fresh_state)
        reports[layout] = loop.evaluate_split(
            setup, setup.parallel_eval_step(), state, dataset.test_images, dataset.test_labels
        )
    pmap, sharded = reports["pmap"], reports["sharded"]
    assert sharded["num_examples"] == pmap["num_examples"] == len(dataset.test_images)
    np.testing.assert_array_equal(sharded["confusion"], pmap["confusion"])
    assert sharded["loss"] == pytest.approx(pmap["loss"], rel=1e-5)
