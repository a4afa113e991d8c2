"""airbench's 93% and 94% recipes (configs/airbench93.py, configs/airbench94.py): the network, its
whitening init, airbench's optimizer (its learning rate and decay on the summed loss as the mean
loss's, BatchNorm biases at 64x, frozen parameters), its schedule, lookahead, the alternating flip
and the mirror-translate TTA, each against airbench's own formulas (KellerJordan/cifar10-airbench),
then through real train steps: freezing, 1 device against 8, a bitwise resume, bad input. And
against airbench's own code run on the same weights and images (a committed fixture): the
logits, two train steps' updates and BatchNorm statistics, and the whitening kernel."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures import make_airbench_parity
from flax import linen as nn, traverse_util
from test_loop import stop_after
from test_reliability import one_line_error
from test_train import run_steps, synthetic_dataset

from benchmarks import airbench_parity
from configs import airbench93, airbench94
from conftest import run_cli
from resnet_jax import checkpoints, loop, models, optimizer, parallel, train
from resnet_jax.data import pipeline, registry
from resnet_jax.data.dataset import Dataset
from resnet_jax.errors import Error
from resnet_jax.workdir import read_metrics

# ------------------------------------------------------------------------------ the network


def group(c_in, width):
    """One ConvGroup: conv1 (3x3, no bias), BatchNorm bias, conv2, BatchNorm bias."""
    return c_in * width * 9 + width + width * width * 9 + width


WHITEN = 3 * 24 * 4 + 24  # the 2x2 whitening conv: 288 weights and 24 biases
# airbench's make_net93 / make_net94 have these parameters plus 2 x (sum of widths) BatchNorm
# weights, which airbench fixes at 1 (requires_grad=False) and flax does not make (use_scale=False):
# 569,016 + 640 = 569,656 and 1,971,640 + 1,152 = 1,972,792 in torch's count.
AIRBENCH93_PARAMS = WHITEN + group(24, 64) + group(64, 128) + group(128, 128) + 128 * 10
AIRBENCH94_PARAMS = WHITEN + group(24, 64) + group(64, 256) + group(256, 256) + 256 * 10


def test_parameter_counts_are_airbenchs_without_its_fixed_batch_norm_weights():
    assert (AIRBENCH93_PARAMS, AIRBENCH94_PARAMS) == (569_016, 1_971_640)
    for name, expected, widths in (("airbench93", 569_016, (64, 128, 128)), ("airbench94", 1_971_640, (64, 256, 256))):
        model = models.get_model(name, num_classes=10)
        init = functools.partial(model.init, train=False)
        variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        assert models.num_params(variables["params"]) == expected
        params = traverse_util.flatten_dict(variables["params"])
        norms = [f"group{g}_norm{n}" for g in (1, 2, 3) for n in (1, 2)]
        # BatchNorm: a bias and no scale; the running statistics exist; no conv but the whitening one has a bias.
        assert sorted(params) == sorted(
            [("whiten", "kernel"), ("whiten", "bias"), ("head", "kernel")]
            + [(f"group{g}_conv{n}", "kernel") for g in (1, 2, 3) for n in (1, 2)]
            + [(norm, "bias") for norm in norms]
        )
        stats = traverse_util.flatten_dict(variables["batch_stats"])
        assert sorted(stats) == sorted((norm, s) for norm in norms for s in ("mean", "var"))
        for g, width in enumerate(widths, start=1):
            assert params[(f"group{g}_norm1", "bias")].shape == stats[(f"group{g}_norm2", "mean")].shape == (width,)
        assert params[("whiten", "kernel")].shape == (2, 2, 3, models.WHITEN_WIDTH) and models.WHITEN_WIDTH == 24


@pytest.fixture(scope="module")
def airbench93_variables():
    model = models.get_model("airbench93", num_classes=10)
    return model, jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_dirac_puts_the_identity_on_the_first_outputs_and_keeps_the_base_init_elsewhere():
    base = nn.initializers.constant(0.5)
    for shape in ((3, 3, 2, 5), (3, 3, 5, 2), (2, 2, 3, 4)):
        kernel = np.asarray(models.dirac(base)(jax.random.key(0), shape))
        n = min(shape[2], shape[3])
        identity = np.zeros(shape[:3] + (n,))
        identity[shape[0] // 2, shape[1] // 2, np.arange(n), np.arange(n)] = 1
        np.testing.assert_array_equal(kernel[..., :n], identity)
        np.testing.assert_array_equal(kernel[..., n:], 0.5)


def test_group_convs_start_as_identities_then_torchs_uniform_and_the_head_is_bias_free(airbench93_variables):
    _, variables = airbench93_variables
    params = variables["params"]
    for name, c_in, c_out in (("group1_conv1", 24, 64), ("group1_conv2", 64, 64), ("group2_conv1", 64, 128)):
        kernel = np.asarray(params[name]["kernel"])
        assert kernel.shape == (3, 3, c_in, c_out)
        n = min(c_in, c_out)
        identity = np.zeros((3, 3, c_in, n), np.float32)
        identity[1, 1, np.arange(n), np.arange(n)] = 1  # torch.nn.init.dirac_ on weight[:in_channels]
        np.testing.assert_array_equal(kernel[..., :n], identity)
        rest, limit = kernel[..., n:], 1 / np.sqrt(9 * c_in)  # PyTorch's Conv2d default: U(+-1/sqrt(fan_in))
        if rest.size:
            assert np.abs(rest).max() <= limit and np.abs(rest).max() > 0.98 * limit
            assert rest.std() == pytest.approx(limit / np.sqrt(3), rel=0.03)
    head = np.asarray(params["head"]["kernel"])
    assert set(params["head"]) == {"kernel"} and head.shape == (128, 10)
    assert np.abs(head).max() <= 1 / np.sqrt(128) and head.std() == pytest.approx(1 / np.sqrt(3 * 128), rel=0.1)
    np.testing.assert_array_equal(params["whiten"]["bias"], 0.0)  # airbench zeroes conv biases


def test_logits_are_the_bias_free_head_over_9_and_the_activation_is_exact_gelu(airbench93_variables):
    model, variables = airbench93_variables
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name in ("whiten", "group1_conv1", "head"):
            seen[context.module.name] = (np.asarray(args[0]), np.asarray(out))
        return out

    with nn.intercept_methods(record):
        logits = np.asarray(model.apply(variables, x, train=False))
    features, head_out = seen["head"]
    assert features.shape == (4, 128)
    manual = features.astype(np.float64) @ np.asarray(variables["params"]["head"]["kernel"], np.float64) / 9
    np.testing.assert_allclose(logits, manual, rtol=1e-3, atol=5e-4)  # (a GPU's TF32 matmul; 1/8 is 12% off)
    np.testing.assert_allclose(logits, head_out / 9, rtol=1e-6)
    # After the whitening conv: GELU with erf (PyTorch's nn.GELU()), not tanh's approximation.
    whitened, after = seen["whiten"][1], seen["group1_conv1"][0]
    np.testing.assert_allclose(after, jax.nn.gelu(whitened, approximate=False), rtol=1e-6, atol=1e-6)
    assert np.abs(after - jax.nn.gelu(whitened, approximate=True)).max() > 1e-4
    z = np.linspace(-4, 4, 101, dtype=np.float32)
    np.testing.assert_allclose(model.act(z), jax.nn.gelu(z, approximate=False), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ whitening


def smooth_images(n=200, seed=0):
    """Correlated images: a random 9x9 field, upsampled 4x and blurred, channels mixed."""
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(n, 9, 9, 3))
    x = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2)[:, :33, :33]
    x = (x[:, :-1, :-1] + x[:, 1:, :-1] + x[:, :-1, 1:] + x[:, 1:, 1:]) / 4  # 32x32
    x = x @ np.array([[1.0, 0.8, 0.6], [0.0, 0.6, 0.7], [0.0, 0.0, 0.4]]) + 0.3
    return x.astype(np.float32) + 0.02 * rng.normal(size=x.shape).astype(np.float32)


def test_the_whitening_kernel_whitens_every_2x2_patch():
    images = smooth_images()
    kernel = models.whitening_kernel(images)
    assert kernel.shape == (2, 2, 3, 24) and kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
    # Every stride-1 2x2 patch, its values in (kh, kw, c) order, the order of an HWIO kernel's inputs.
    patches = np.stack(
        [images[:, i : i + 31, j : j + 31, :] for i in (0, 1) for j in (0, 1)], axis=3
    )  # (n, 31, 31, kh*kw, c)
    patches = patches.reshape(-1, 12).astype(np.float64)
    moment = patches.T @ patches / len(patches)
    eigenvalues = np.linalg.eigvalsh(moment)[::-1]
    outputs = patches @ kernel[..., :12].reshape(12, 12).astype(np.float64)
    whitened = outputs.T @ outputs / len(outputs)
    expected = eigenvalues / (eigenvalues + 5e-4)  # airbench's eps; largest eigenvalue first
    np.testing.assert_allclose(whitened, np.diag(expected), atol=2e-4)
    assert expected.min() < 0.9  # eps matters on these images: its absence would fail the line above
    # The conv itself (HWIO, VALID) computes the same outputs.
    conv = jax.lax.conv_general_dilated(
        images[:2], kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    np.testing.assert_allclose(np.asarray(conv)[..., :12].reshape(-1, 12), outputs[: 2 * 31 * 31], rtol=1e-4, atol=1e-4)


def fake_dataset(images, classes=10):
    n = len(images)
    labels = (np.arange(n) % classes).astype(np.int32)
    channels = images.shape[-1]
    return Dataset(
        name="fake", class_names=tuple(map(str, range(classes))), train_images=images, train_labels=labels,
        test_images=images[:32], test_labels=labels[:32], mean=np.full(channels, 120.0, np.float32),
        std=np.full(channels, 60.0, np.float32),
    )  # fmt: skip


def tiny_airbench(steps=-1, batch_size=16):
    """configs/airbench93.py on a batch of `batch_size`, for `steps` steps (-1: its 11 epochs)."""
    config = airbench93.get_config()
    config.batch_size = config.eval_batch_size = batch_size
    config.num_train_steps = steps
    return config


def test_a_fresh_start_computes_the_whitening_kernel_from_the_first_5000_normalised_train_images():
    images = np.random.default_rng(0).integers(0, 256, (5100, 32, 32, 3), dtype=np.uint8)
    dataset = fake_dataset(images)
    setup = train.Setup(tiny_airbench(), dataset)
    fresh = setup.fresh_state
    state = setup.initialised(fresh)
    normalised = (images.astype(np.float32) - dataset.mean) / dataset.std
    expected = models.whitening_kernel(normalised[: train.WHITENING_IMAGES])
    assert train.WHITENING_IMAGES == 5000
    np.testing.assert_allclose(state.params["whiten"]["kernel"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(models.whitening_kernel(normalised), expected, rtol=1e-3, atol=1e-4)  # the first 5000 only
    # Everything else is the fresh state's; the lookahead average starts from the new weights.
    flat, before = traverse_util.flatten_dict(state.params), traverse_util.flatten_dict(fresh.params)
    assert all(np.array_equal(flat[k], before[k]) for k in flat if k != ("whiten", "kernel"))
    chex.assert_trees_all_equal(state.lookahead, {"params": state.params, "batch_stats": state.batch_stats})
    assert int(state.step) == 0 and state.opt_state is fresh.opt_state


def test_whitening_images_of_another_number_of_channels_is_refused_in_one_line():
    # No data set of the registry has other than 3 channels (an image folder's are RGB): a fake one.
    assert {source.image_shape(airbench93.get_config().data)[-1] for source in registry.DATASETS.values()} == {3}
    gray = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)
    setup = train.Setup(tiny_airbench(), fake_dataset(gray))
    with pytest.raises(Error) as e:
        setup.initialised(setup.fresh_state)
    message = str(e.value)
    assert "airbench93's whitening conv has 24 outputs" in message and "3-channel images" in message
    assert "have 1 channels" in message and "\n" not in message


# ---------------------------------------------------------------------- airbench's optimizer


def test_learning_rate_and_decay_are_airbenchs_per_1024_examples():
    """airbench's formulas; the summed loss they apply to, and the update they make, are held
    against airbench's optimizer in test_two_train_steps_update_the_params_as_airbenchs_optimizer."""
    config = airbench93.get_config()
    scale = 1024 * (1 + 1 / (1 - 0.85))  # airbench's kilostep_scale at momentum 0.85
    lr, wd = 11.5 / scale, 0.0153 * 1024 / scale  # airbench's lr and its SGD's weight_decay x lr, batch 1024
    # The same steps on the mean loss of the batch: the learning rate x batch, the L2 coefficient wd / lr / batch.
    assert optimizer.peak_learning_rate(config) == pytest.approx(lr * 1024, rel=1e-12)
    assert config.weight_decay == pytest.approx(wd / lr / 1024, rel=1e-12)
    config.batch_size = 512  # airbench's lr on the summed loss, its decay x batch: linear scaling on the mean loss
    assert optimizer.peak_learning_rate(config) == pytest.approx(lr * 512, rel=1e-12)


def test_param_rules_put_batch_norm_biases_at_64x_and_freeze_the_whitening_conv(airbench93_variables):
    _, variables = airbench93_variables
    rules = traverse_util.flatten_dict(optimizer.param_rules(airbench93.get_config(), variables["params"]), sep="/")
    expected = {name: (1.0, 1.0, None) for name in rules}  # (lr x, decay x, epochs it trains)
    expected.update({f"group{g}_norm{n}/bias": (64.0, 1 / 64, None) for g in (1, 2, 3) for n in (1, 2)})
    expected.update({"whiten/bias": (1.0, 1.0, 3), "whiten/kernel": (1.0, 1.0, 0)})
    assert rules == expected and len(rules) == 15


def test_the_airbench_schedule_is_airbenchs_get_lr():
    config = airbench93.get_config()
    total, peak = 528, optimizer.peak_learning_rate(config)

    def get_lr(step):  # airbench's, as a multiple of the peak
        warmup_steps = int(total * 0.23)
        warmup_lr, peak_lr, end_lr = 0.2, 1.0, 0.07
        if step < warmup_steps:
            frac = step / warmup_steps
            return warmup_lr * (1 - frac) + peak_lr * frac
        frac = (step - warmup_steps) / (total - warmup_steps)
        return peak_lr * (1 - frac) + end_lr * frac

    schedule = optimizer.create_learning_rate_fn(config, steps_per_epoch=48, num_steps=total)
    for step in (0, 1, 60, 120, 121, 122, 300, 527):
        assert float(schedule(step)) == pytest.approx(get_lr(step) * peak, rel=1e-6), step


def test_lookahead_decay_is_airbenchs_alpha_schedule():
    for step, total in ((5, 100), (50, 100), (100, 100), (35, 528), (525, 528)):
        assert train.lookahead_decay(step, 5, 0.95, total) == pytest.approx(0.95**5 * (step / total) ** 3, rel=1e-12)


def tiny_lookahead_state(step):
    variables = {
        "params": {"conv": {"kernel": np.array([1.0, 2.0], np.float32)}, "norm": {"bias": np.array([3.0], np.float32)}},
        "batch_stats": {"norm": {"mean": np.array([0.5], np.float32), "var": np.array([2.0], np.float32)}},
    }
    average = jax.tree_util.tree_map(lambda x: x - 1.0, variables)
    state = train.TrainState.create(
        apply_fn=None, tx=optax.sgd(0.1), train_metrics={}, lookahead=average, **variables
    ).replace(step=jnp.int32(step))
    return state, variables, average


def test_lookahead_moves_weights_and_batch_norm_statistics_to_their_average_every_5_steps():
    every, decay, total = 5, 0.95, 98
    for step in (10, 95):  # a move: the average toward the weights, the weights to it
        state, current, average = tiny_lookahead_state(step)
        moved = train.lookahead_move(state, every, decay, total)
        weight = 1 - 0.95**5 * (step / total) ** 3
        expected = jax.tree_util.tree_map(lambda a, c, w=weight: a + w * (c - a), average, current)
        chex.assert_trees_all_close(moved.lookahead, expected, rtol=1e-6)
        chex.assert_trees_all_close({"params": moved.params, "batch_stats": moved.batch_stats}, expected, rtol=1e-6)
    state, current, average = tiny_lookahead_state(12)  # between moves: nothing changes
    moved = train.lookahead_move(state, every, decay, total)
    chex.assert_trees_all_equal(moved.lookahead, average)
    chex.assert_trees_all_equal({"params": moved.params, "batch_stats": moved.batch_stats}, current)
    state, current, average = tiny_lookahead_state(total)  # the last step (no multiple of 5): the weights jump
    moved = train.lookahead_move(state, every, decay, total)
    chex.assert_trees_all_equal(moved.lookahead, average)
    chex.assert_trees_all_equal({"params": moved.params, "batch_stats": moved.batch_stats}, average)


def whiten_bias_optimizer_state(state):
    """The leaves of the optimizer state of whiten/bias (its momentum trace)."""
    leaves = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if {"whiten", "bias"} <= {getattr(key, "key", None) for key in path}
    ]
    assert leaves
    return leaves


def test_frozen_parameters_and_lookahead_through_real_train_steps():
    """airbench93 on 64 images at batch 16 (4 steps an epoch) for 16 steps: whiten/kernel never
    trains, whiten/bias trains the first 3 epochs (12 steps), the rest all along; lookahead moves
    the weights to their average at steps 5, 10, 15 and the last one."""
    config, steps = tiny_airbench(steps=16), 16
    setup = train.Setup(config, synthetic_dataset(n=64))
    assert (setup.steps_per_epoch, setup.num_steps) == (4, steps)
    devices = jax.local_devices()[:1]
    start = setup.initialised(setup.fresh_state)
    host = lambda s: jax.tree_util.tree_map(np.array, s)  # noqa: E731 - copies: the step donates its state
    states = [host(start)]
    state, step_fn = setup.layout.replicate(start, devices=devices), setup.parallel_train_step(devices=devices)
    for batch in setup.train_batches(0, steps, devices):
        assert "flip" in batch  # the alternating flip
        state = step_fn(state, batch)
        states.append(host(setup.layout.unreplicate(state)))

    def param(s, name):
        return traverse_util.flatten_dict(states[s].params, sep="/")[name]

    for s in range(1, steps + 1):
        np.testing.assert_array_equal(param(s, "whiten/kernel"), param(0, "whiten/kernel"))
        for name in ("group1_conv1/kernel", "group2_norm1/bias", "head/kernel"):
            if s < steps:  # (the last step's weights are the average, unmoved since step 15: below)
                assert not np.array_equal(param(s, name), param(s - 1, name)), (s, name)
        trace, before = whiten_bias_optimizer_state(states[s]), whiten_bias_optimizer_state(states[s - 1])
        if s <= 12:  # the first 3 epochs: the bias and its momentum train
            assert not np.array_equal(param(s, "whiten/bias"), param(s - 1, "whiten/bias")), s
            assert not all(np.array_equal(a, b) for a, b in zip(trace, before)), s
        else:  # then neither: no update, no momentum, no decay; only lookahead's moves (15, 16) move it
            chex.assert_trees_all_equal(trace, before)
            if s in (13, 14):
                np.testing.assert_array_equal(param(s, "whiten/bias"), param(12, "whiten/bias"))
    for s in (5, 10, 15, 16):  # the weights and BatchNorm statistics are their average
        chex.assert_trees_all_equal(
            {"params": states[s].params, "batch_stats": states[s].batch_stats}, states[s].lookahead
        )
    chex.assert_trees_all_equal(states[6].lookahead, states[9].lookahead, states[5].lookahead)
    chex.assert_trees_all_equal(states[16].lookahead, states[15].lookahead)
    chex.assert_trees_all_equal(states[16].params, states[15].params)  # step 16's update is dropped
    assert not np.array_equal(states[6].params["head"]["kernel"], states[6].lookahead["params"]["head"]["kernel"])


# ------------------------------------------------------------- against airbench's own code
#
# tests/fixtures/airbench_parity.npz holds what airbench's own code (make_net93/94, init_whitening_conv,
# train93/94 with its hyperparameters) computed from weights and images that NumPy rebuilds here
# from a seed (tests/fixtures/make_airbench_parity.py). Our side is what a run uses: train.Setup
# on configs/airbench93.py and airbench94.py, its fresh state given those weights, its train step.
# With AIRBENCH naming a checkout of airbench (and AIRBENCH_PYTHON a Python with torch and
# torchvision, default this one), airbench also runs now and must agree with the fixture.

AIRBENCH_FIXTURE = dict(np.load(make_airbench_parity.PATH))
# Each tolerance lies well above the gap measured between the two frameworks in float32 (the
# tests' docstrings give it) and below the effect of any one of airbench's settings.
LOGITS_ATOL = 1e-5  # logits of 0.1-1
UPDATE_RTOL = 2e-3  # a step's update: |ours - airbench's| / airbench's largest in the output channel
STATS_RTOL = 2e-5  # BatchNorm's running means and variances: |ours - airbench's| / airbench's largest in the layer
WHITENING_RTOL = 2e-3  # the whitening operators, relative (Frobenius norm)


@functools.cache
def live_airbench(checkout: str) -> dict:
    """airbench's arrays from its code run now: make_airbench_parity under AIRBENCH_PYTHON."""
    python = os.environ.get("AIRBENCH_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "live.npz")
        command = [python, make_airbench_parity.__file__, "--airbench", checkout, "--out", out]
        subprocess.run(command, check=True, capture_output=True)
        return dict(np.load(out))


def airbench_side(model: str) -> dict:
    """The fixture's arrays of `model`; with AIRBENCH set, first held against airbench run now."""
    fixture = {k[len(model) + 1 :]: v for k, v in AIRBENCH_FIXTURE.items() if k.startswith(model + "/")}
    if os.environ.get("AIRBENCH"):
        live = live_airbench(os.environ["AIRBENCH"])
        for key, value in fixture.items():
            if value.dtype.kind == "f":
                atol = 1e-5 * np.abs(value).max()
                np.testing.assert_allclose(live[f"{model}/{key}"], value, rtol=1e-5, atol=atol, err_msg=key)
            elif key != "torch_version":
                np.testing.assert_array_equal(live[f"{model}/{key}"], value, err_msg=key)
    return fixture


def their_variables(theirs: dict, step: int) -> dict:
    """airbench's params and BatchNorm statistics at `step` (0: the start), as ours."""
    prefix = f"step{step}/"
    return airbench_parity.torch_to_flax({k: v for k, v in theirs.items() if k.startswith(prefix)}, prefix)


def airbench_start(theirs: dict) -> dict:
    """The weights airbench started from, rebuilt with NumPy, as our params and BatchNorm statistics."""
    keys = list(theirs["keys"])
    shapes = [tuple(int(d) for d in s.split(",") if d) for s in theirs["shapes"]]
    values = make_airbench_parity.state_dict_values(keys, shapes)
    for key in keys:  # the arrays airbench started from
        np.testing.assert_array_equal(make_airbench_parity.sampled(values[key]), theirs[f"step0/{key}"], err_msg=key)
    return airbench_parity.torch_to_flax(values, "")


def sampled(variables: dict) -> dict:
    """Our variables as flat {name: array}, cut as the fixture's (`make_airbench_parity.sampled`):
    of each conv kernel (HWIO), the output channels SAMPLE of the first INPUTS input channels."""
    outputs, inputs = list(make_airbench_parity.SAMPLE), make_airbench_parity.INPUTS
    flat = traverse_util.flatten_dict(variables, sep="/")
    return {
        k: (np.asarray(v)[:, :, :inputs][..., outputs] if np.ndim(v) == 4 else np.asarray(v)) for k, v in flat.items()
    }


def fixture_dataset():
    images, labels = make_airbench_parity.images(), make_airbench_parity.labels()
    return Dataset(
        name="airbench_fixture", class_names=tuple(map(str, range(10))), train_images=images, train_labels=labels,
        test_images=images[:16], test_labels=labels[:16], mean=make_airbench_parity.MEAN,
        std=make_airbench_parity.STD,
    )  # fmt: skip


def recipe_setup(model: str):
    """configs/MODEL.py at batch 16 on the fixture's 768 images: 48 steps an epoch, as CIFAR-10's
    50,000 at batch 1,024; no augmentation (airbench's side takes the batches as they are)."""
    config = {"airbench93": airbench93, "airbench94": airbench94}[model].get_config()
    config.batch_size = config.eval_batch_size = make_airbench_parity.BATCH
    config.data.augment = False
    return train.Setup(config, fixture_dataset())


@pytest.fixture(scope="module", params=make_airbench_parity.MODELS)
def recipe_steps(request):
    """(model, airbench's arrays, the Setup, our variables before the first step and after each step)."""
    model = request.param
    theirs = airbench_side(model)
    setup = recipe_setup(model)
    devices = jax.local_devices()[:1]
    state = setup.layout.replicate(setup.with_weights(setup.fresh_state, airbench_start(theirs)), devices)
    step_fn = setup.parallel_train_step(devices=devices)
    batch, images, labels = make_airbench_parity.BATCH, setup.dataset.train_images, setup.dataset.train_labels
    position = np.arange(batch, dtype=np.int32)
    rows = [slice(step * batch, (step + 1) * batch) for step in range(make_airbench_parity.STEPS)]
    batches = [{"image": images[r], "label": labels[r], "position": position} for r in rows]
    states = [setup.layout.unreplicate(state)]
    for placed in setup.layout.device_batches(batches, devices):
        state = step_fn(state, placed)
        states.append(setup.layout.unreplicate(state))
    return model, theirs, setup, [{"params": s.params, "batch_stats": s.batch_stats} for s in states]


def logits_gaps(recipe_steps) -> dict:
    """{mode: max |ours - airbench's|} of the logits of the first batch at the start."""
    _, theirs, setup, variables = recipe_steps
    images = setup.preprocess_fn(setup.dataset.train_images[: make_airbench_parity.BATCH])
    apply = functools.partial(setup.fresh_state.apply_fn, variables[0])

    @jax.jit
    def logits(x):  # train mode averages BatchNorm's statistics over the devices' axis: one device's here
        train_mode = jax.vmap(lambda x: apply(x, train=True, mutable=["batch_stats"])[0], axis_name=parallel.AXIS)
        return train_mode(x[None])[0], apply(x, train=False)

    train_logits, eval_logits = logits(images)
    assert min(np.abs(theirs[f"logits/{mode}"]).max() for mode in ("train", "eval")) > 0.1  # not near-zero logits
    return {
        "train": float(np.abs(np.asarray(train_logits) - theirs["logits/train"]).max()),
        "eval": float(np.abs(np.asarray(eval_logits) - theirs["logits/eval"]).max()),
    }


def update_gaps(recipe_steps) -> dict:
    """{(step, param): the largest |our update - airbench's| of a kernel's output channel (a bias:
    of the layer) over the largest of airbench's there; a step's update is the params after it
    minus before it."""
    model, theirs, _, variables = recipe_steps
    their_start = sampled(their_variables(theirs, 0)["params"])
    start = sampled(variables[0]["params"])
    gaps = {}
    for step in range(1, make_airbench_parity.STEPS + 1):
        their_params, params = sampled(their_variables(theirs, step)["params"]), sampled(variables[step]["params"])
        for name, value in params.items():
            ours, their_update = value - start[name], their_params[name] - their_start[name]
            if name == "whiten/kernel":  # frozen in both (airbench: requires_grad=False)
                assert not ours.any() and not their_update.any()
                continue
            # Per output channel of a kernel: the TINY channels' updates are ~1,000x the others'.
            axes = tuple(range(ours.ndim - 1)) if ours.ndim > 1 else None
            scale = np.abs(their_update).max(axis=axes, keepdims=True)
            assert (scale > 0).all(), (model, step, name)
            gaps[step, name] = float((np.abs(ours - their_update).max(axis=axes, keepdims=True) / scale).max())
    return gaps


def stats_gaps(recipe_steps) -> dict:
    """{(step, layer, "mean" | "var"): max |ours - airbench's| / the largest of airbench's in the layer}."""
    _, theirs, _, variables = recipe_steps
    momentum = float(theirs["bn_momentum"])  # torch's: 1 - airbench's 0.6
    their_stats = [their_variables(theirs, step)["batch_stats"] for step in range(make_airbench_parity.STEPS + 1)]
    gaps = {}
    for layer in their_stats[0]:
        size = 31 // 2 ** int(layer[5])  # group g: the 31x31 whitened image after g 2x2 max-pools
        n = make_airbench_parity.BATCH * size * size  # the values a channel's batch statistics are over
        # torch's running variance takes the batch's unbiased variance, u = v n / (n - 1), flax's
        # the biased v. With d_k = torch's - flax's after step k: d_0 = 0 and d_k = (1 - m) d_{k-1}
        # + m (u_k - v_k) = (1 - m) d_{k-1} + m u_k / n, where m u_k = torch_k - (1 - m) torch_{k-1}.
        drift = 0.0
        for step in range(1, make_airbench_parity.STEPS + 1):
            torch_var, before = their_stats[step][layer]["var"], their_stats[step - 1][layer]["var"]
            drift = (1 - momentum) * drift + (torch_var - (1 - momentum) * before) / n
            expected = {"mean": their_stats[step][layer]["mean"], "var": torch_var - drift}
            for stat, value in expected.items():
                ours = np.asarray(variables[step]["batch_stats"][layer][stat])
                gaps[step, layer, stat] = float(np.abs(ours - value).max() / np.abs(value).max())
    return gaps


def test_logits_in_train_and_eval_mode_are_airbenchs(recipe_steps):
    """The first batch's logits from the starting weights. Measured gap: 8.5e-7 (train mode), 8.1e-7
    (eval mode). Each group's first conv has a channel of batch variance ~1e-6, which BatchNorm's
    eps of 1e-12 (airbench's) normalises to unit variance and an eps of 1e-5 to about 0.3 of it."""
    for mode, gap in logits_gaps(recipe_steps).items():
        assert gap <= LOGITS_ATOL, f"{mode} mode: logits off by {gap:.2e}"


def test_the_first_steps_learning_rate_is_airbenchs(recipe_steps):
    """The learning rate of steps 0 and 1 is the one airbench's SGD held for its parameters other
    than BatchNorm's biases: its get_lr over the recipe's 528 (airbench93) or 476 steps, times
    11.5 / kilostep_scale, on its summed loss; ours is of the batch's mean loss, so the batch size
    times that. (The biases' 64x is held by the updates, below.)"""
    _, theirs, setup, _ = recipe_steps
    for step, (_, rest) in enumerate(theirs["lr"]):
        summed_loss_lr = float(setup.learning_rate_fn(step)) / setup.config.batch_size
        assert summed_loss_lr == pytest.approx(rest, rel=1e-6), step


def test_two_train_steps_update_the_params_as_airbenchs_optimizer(recipe_steps):
    """Each step's update (the params after it minus before it) against airbench's, per output
    channel: its summed loss with label smoothing 0.2, Nesterov SGD at momentum 0.85, its
    learning rate and decay per group (BatchNorm biases at 64x the learning rate, their decay
    not), the whitening kernel frozen. Measured gap: 2.4e-4 of the channel's largest update; the
    decay alone is 9-16% of it in several layers."""
    gaps = update_gaps(recipe_steps)
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= UPDATE_RTOL, f"step {worst[0]} {worst[1]}: off by {gaps[worst]:.2e} of airbench's update"


def test_two_train_steps_update_batch_norm_statistics_as_airbench(recipe_steps):
    """The running means and variances after each step: BatchNorm momentum 0.6 (torch's 0.4),
    over the batch's values. Measured gap: 3.4e-6 of the layer's largest; torch's unbiased variance
    unconverted would be 1.1e-4 (group 1) to 4.4e-3 (group 3)."""
    gaps = stats_gaps(recipe_steps)
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= STATS_RTOL, f"step {worst[0]} {worst[1]} {worst[2]}: off by {gaps[worst]:.2e}"


def whitening_operators(kernel: np.ndarray):
    """A 2x2 whitening kernel's (HWIO) A A^T and A B^T, A its first 12 outputs and B the other 12
    (as rows of (kh, kw, c), the patch's values): with A's columns the eigenvectors of the patches'
    second moment M, each over sqrt(eigenvalue + eps), A A^T = (M + eps I)^-1 whatever their signs
    and order (two of the eigenvalues here are 0.3% apart, so the eigenvectors are not comparable
    one by one), and A B^T = -A A^T when B = -A. And A's column norms, 1 / sqrt(eigenvalue + eps)
    in A's order."""
    a, b = (np.asarray(kernel, np.float64)[..., half].reshape(12, 12) for half in (slice(0, 12), slice(12, 24)))
    return a @ a.T, a @ b.T, np.linalg.norm(a, axis=0)


def test_the_whitening_kernel_is_airbenchs_init_whitening_conv(recipe_steps):
    """A fresh run's whitening kernel, from the fixture's 768 images (Setup.initialised) against
    airbench's init_whitening_conv of the same normalised images: the images' smallest eigenvalues
    (8e-4, 4e-3) are near airbench's eps of 5e-4, so an eps of 5e-3 moves the operators by 50-75%.
    Measured gap: 4e-4 (airbench's float32 second moment and eigh, ours in float64)."""
    _, theirs, setup, _ = recipe_steps
    ours = whitening_operators(setup.initialised(setup.fresh_state).params["whiten"]["kernel"])
    expected = whitening_operators(theirs["whitening"].transpose(2, 3, 1, 0))  # OIHW -> HWIO
    for name, mine, value in zip(("A A^T", "A B^T", "column norms"), ours, expected):
        gap = np.linalg.norm(mine - value) / np.linalg.norm(value)
        assert gap <= WHITENING_RTOL, f"{name}: off by {gap:.2e}"


# ------------------------------------------------------------------------- alternating flip


def test_the_alternating_flip_is_one_draw_per_run_mirrored_on_odd_epochs():
    n, batch, seed = 1000, 100, 3  # 10 steps an epoch
    flips = functools.partial(pipeline.alternating_flips, num_examples=n, batch_size=batch, seed=seed)
    everyone = np.arange(n)
    epoch0 = flips(everyone, 0)
    assert epoch0.dtype == bool and 0.45 < epoch0.mean() < 0.55
    for step in (3, 9):  # any step of epoch 0
        np.testing.assert_array_equal(flips(everyone, step), epoch0)
    for epoch in (1, 2, 3, 6):
        np.testing.assert_array_equal(flips(everyone, 10 * epoch + 7), epoch0 ^ bool(epoch % 2))
    np.testing.assert_array_equal(flips(everyone[::-1], 15), ~epoch0[::-1])  # per index, in any order
    other = pipeline.alternating_flips(everyone, 0, num_examples=n, batch_size=batch, seed=seed + 1)
    assert 0.35 < np.mean(other != epoch0) < 0.65  # another seed, another draw
    # A train batch carries its rows' flips, whichever rows (devices, processes) read it.
    images = np.zeros((n, 2, 2, 1), np.uint8)
    labels = everyone.astype(np.int32)  # each label is its index
    for step in (4, 17):
        parts = [
            pipeline.train_batch(images, labels, step, batch_size=batch, seed=seed, part=part, alternating_flip=True)
            for part in (slice(None), slice(0, 30), slice(30, 100))
        ]
        whole = parts[0]
        np.testing.assert_array_equal(whole["flip"], flips(whole["label"], step))
        np.testing.assert_array_equal(np.concatenate([p["flip"] for p in parts[1:]]), whole["flip"])
    assert "flip" not in pipeline.train_batch(images, labels, 0, batch_size=batch, seed=seed)


def test_augment_mirrors_exactly_the_rows_the_flips_name():
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    flips = np.array([True, False, True, True, False, False])
    out, keep = pipeline.augment(
        jax.random.key(0), jnp.asarray(images), jnp.arange(6), crop_padding=0, flips=jnp.asarray(flips)
    )
    expected = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(keep, 1.0)


# --------------------------------------------------------------------------- test-time views


def test_flip_translate_tta_is_airbenchs_infer_mirror_translate():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    weights = rng.normal(size=(32 * 32 * 3, 10)).astype(np.float32)

    def net(x):  # a linear "model" of NHWC images
        return np.asarray(x, np.float64).reshape(len(x), -1) @ weights.astype(np.float64)

    def infer_mirror(x):
        return 0.5 * net(x) + 0.5 * net(x[:, :, ::-1])  # torch's inputs.flip(-1): NCHW's width

    def infer_mirror_translate(x):
        logits = infer_mirror(x)
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")  # F.pad(..., "reflect")
        translated = [padded[:, 0:32, 0:32], padded[:, 2:34, 2:34]]
        logits_translate = np.mean([infer_mirror(t) for t in translated], axis=0)
        return 0.5 * logits + 0.5 * logits_translate

    apply_fn = lambda x: jnp.dot(x.reshape(len(x), -1), weights, precision="highest")  # noqa: E731
    got = train.tta_logits(apply_fn, jnp.asarray(images), "flip_translate")
    np.testing.assert_allclose(got, infer_mirror_translate(images), rtol=1e-4, atol=1e-3)
    assert not np.allclose(got, infer_mirror(images), rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ devices, resume, bad input


@pytest.fixture
def narrow_airbench93(monkeypatch):
    """configs/airbench93.py's model narrowed to groups of 16 for the tests that train (and compile
    the train step) several times: a fraction of the time, the same recipe and code paths. Its first
    group's conv also has fewer outputs than inputs (24 -> 16), dirac's other case."""
    monkeypatch.setitem(models.MODELS, "airbench93", functools.partial(models.Airbench, widths=(16, 16, 16)))


@pytest.mark.multidevice
def test_airbench93_trains_the_same_on_1_and_8_devices(narrow_airbench93):
    """6 steps of airbench93's recipe (batch 32: 4 images a device) on 1 and 8 devices: the mean
    loss's gradients are averaged over the devices, BatchNorm synced, a lookahead move at step 5."""
    config, dataset = tiny_airbench(batch_size=32), synthetic_dataset()
    one = run_steps(config, dataset, 1, steps=6)
    eight = run_steps(config, dataset, 8, steps=6)
    assert int(eight.step) == 6
    for name in ("params", "batch_stats", "lookahead"):
        chex.assert_trees_all_close(getattr(eight, name), getattr(one, name), rtol=1e-4, atol=1e-5)
    start = train.Setup(config, dataset)
    start = start.initialised(start.fresh_state).params
    moved = [np.abs(a - b).max() for a, b in zip(*map(jax.tree_util.tree_leaves, (one.params, start)))]
    assert max(moved) > 1e-2  # something was learned, well beyond that tolerance


TIMINGS = ("images_per_sec", "elapsed_seconds", "compile_seconds", "eval_seconds")


def airbench_run(workdir, stop_at=None):
    """airbench93 on 64 images at batch 16 for 14 steps (lookahead moves at 5, 10 and 14; the whitening
    bias frozen after 12), in-process; stopped by a SIGTERM after step `stop_at`. Returns the
    Setup.initialised calls it made."""
    config, dataset = tiny_airbench(steps=14), synthetic_dataset(n=64)
    config.keep_checkpoints = 10
    calls = []
    real = train.Setup.initialised

    def initialised(setup, state):
        calls.append(int(state.step))
        return real(setup, state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.Setup, "initialised", initialised)
        if stop_at is None:
            assert loop.train_and_evaluate(config, str(workdir), dataset) is True
        else:
            stop_after(workdir, "pmap", step=stop_at, config=config, dataset=dataset)
    return calls


def saved_state(workdir):
    """The latest checkpoint of an `airbench_run` as a state dict."""
    config, dataset = tiny_airbench(steps=14), synthetic_dataset(n=64)
    template = train.Setup(config, dataset).fresh_state
    manager = checkpoints.create_manager(str(workdir), 10, read_only=True)
    try:
        return flax.serialization.to_state_dict(checkpoints.restore_latest(manager, template))
    finally:
        manager.close()


def test_airbench93_resumes_bitwise_and_keeps_its_checkpointed_whitening_kernel(narrow_airbench93, tmp_path):
    reference, workdir = tmp_path / "uninterrupted", tmp_path / "stopped"
    assert airbench_run(reference) == [0]
    assert airbench_run(workdir, stop_at=7) == [0]
    resumed = shutil.copytree(workdir, tmp_path / "resumed")
    assert airbench_run(resumed) == []  # a resume restores the kernel; it is not computed again
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]  # noqa: E731
    assert strip(read_metrics(str(resumed / "metrics.jsonl"))) == strip(read_metrics(str(reference / "metrics.jsonl")))
    final = saved_state(resumed)
    chex.assert_trees_all_equal(final, saved_state(reference))
    # The kernel the first run computed and saved, from its normalised train images (all 64 of them) ...
    dataset = synthetic_dataset(n=64)
    expected = models.whitening_kernel((dataset.train_images.astype(np.float32) - dataset.mean) / dataset.std)
    stopped = saved_state(workdir)
    assert int(stopped["step"]) == 7
    np.testing.assert_allclose(stopped["params"]["whiten"]["kernel"], expected, rtol=1e-5, atol=1e-6)
    # ... is the one the resumed run trained with and ended with.
    np.testing.assert_array_equal(final["params"]["whiten"]["kernel"], stopped["params"]["whiten"]["kernel"])
    assert not np.array_equal(stopped["lookahead"]["params"]["head"]["kernel"], stopped["params"]["head"]["kernel"])


@pytest.mark.slow
def test_a_run_through_run_py_checkpoints_the_whitening_kernel_of_its_data(tiny_data_dir, tmp_path):
    workdir = tmp_path / "run"
    common = (
        "--config", "configs/airbench93.py", "--workdir", str(workdir), f"--config.data.data_dir={tiny_data_dir}",
        "--config.batch_size=64", "--config.eval_batch_size=64", "--config.num_train_steps=2",
        "--config.checkpoint_every_steps=1", "--config.log_every_steps=1",
    )  # fmt: skip
    result = run_cli(*common)
    assert result.returncode == 0, result.stderr[-3000:]
    config = airbench93.get_config()
    config.data.data_dir, config.batch_size, config.eval_batch_size, config.num_train_steps = tiny_data_dir, 64, 64, 2
    dataset = registry.load_dataset(config.data)
    images = dataset.train_images[: train.WHITENING_IMAGES].astype(np.float32)
    expected = models.whitening_kernel((images - dataset.mean) / dataset.std)
    template = train.Setup(config, dataset).fresh_state
    manager = checkpoints.create_manager(str(workdir), 3, read_only=True)
    try:
        saved = checkpoints.restore_latest(manager, template)
    finally:
        manager.close()
    assert int(saved.step) == 2
    np.testing.assert_allclose(saved.params["whiten"]["kernel"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(template.params["whiten"]["kernel"], expected, atol=1e-3)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.lookahead_every=-1", "--config.lookahead_every must be >= 1 (0: off)"),
        ('--config.param_rules=(("whiten/kernel",1,1),)', "--config.param_rules: ('whiten/kernel', 1, 1) is not"),
        ("--config.model.num_filters=32", "--config.model.num_filters does not apply to airbench93"),
    ],
)
def test_bad_airbench_settings_give_one_line_and_exit_2(tmp_path, override, message):
    result = run_cli("--config", "configs/airbench93.py", "--workdir", str(tmp_path / "w"), override)
    assert message in one_line_error(result, 2)
    assert not (tmp_path / "w").exists()


def test_a_rule_for_a_parameter_the_model_lacks_gives_one_line_and_exit_2(tiny_data_dir, tmp_path):
    result = run_cli(
        "--config", "configs/airbench93.py", "--workdir", str(tmp_path / "w"),
        f"--config.data.data_dir={tiny_data_dir}", "--config.batch_size=64",
        '--config.param_rules=(("nope",1,1,3),(".*",1,1,-1))',
    )  # fmt: skip
    line = one_line_error(result, 2)
    assert "--config.param_rules: 'nope' matches no parameter of airbench93" in line, line
    assert "--mode summary lists them" in line
