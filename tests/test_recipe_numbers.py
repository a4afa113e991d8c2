"""A recipe's training behaviour held against numbers from outside the code: torch's documented
defaults (SGD with Nesterov momentum, BatchNorm's momentum, Linear's init), Zhang et al.'s Mixup
and a fair coin for the flip, each written here as a formula or a distribution.

Everything goes through the path a run takes: `train.Setup` on configs/resnet18.py, its
preprocessing, optimizer, train step and mix draw, so the tests hold whatever the optimizer
and augmentation code look like inside.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import traverse_util

from configs import resnet18
from resnet_jax import train
from resnet_jax.data.dataset import Dataset

# Normalisation by mean 127.5 and std 32 is exact in float32 (a half-integer shift, a power-of-two
# scale): the tests know each normalised pixel exactly.
MEAN, STD = 127.5, 32.0


def dataset(n=64):
    """`n` random CIFAR-shaped images (pixels about N(144, 64): normalised about N(0.5, 2))."""
    rng = np.random.default_rng(0)
    images = np.clip(np.rint(rng.normal(MEAN + 16, 64, (n, 32, 32, 3))), 0, 255).astype(np.uint8)
    labels = np.arange(n, dtype=np.int32) % 10
    return Dataset(
        "random",
        tuple(map(str, range(10))),
        images,
        labels,
        images[:10],
        labels[:10],
        np.full(3, MEAN, np.float32),
        np.full(3, STD, np.float32),
    )


def recipe(**overrides):
    """configs/resnet18.py, full width, with `overrides` ("data__augment" for data.augment)."""
    config = resnet18.get_config()
    for name, value in overrides.items():
        *parents, field = name.split("__")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, field, value)
    return config


@pytest.fixture(scope="module")
def setup():
    """The recipe's Setup at batch 16 on 64 images (4 steps an epoch), unaugmented."""
    return train.Setup(recipe(batch_size=16, data__augment=False), dataset())


# ------------------------------------------------------------------------------ flip


def mirrored(out, image, pad):
    """Whether `out` is a crop (offsets 0..2 x pad) of `image` padded by `pad` as it is (False) or
    mirrored left to right (True); None if neither or both. Compares the pixels at least `pad` from
    the border, which lie inside the image whatever the padding mode."""
    height, width, _ = image.shape
    windows = np.lib.stride_tricks.sliding_window_view(image, (height - 2 * pad, width - 2 * pad), axis=(0, 1))
    found = []
    for flip, view in ((False, out), (True, out[:, ::-1])):
        inner = view[pad : height - pad, pad : width - pad].transpose(2, 0, 1)  # as `windows` holds them
        if (windows == inner).all(axis=(-3, -2, -1)).any():
            found.append(flip)
    return found[0] if len(found) == 1 else None


def test_the_recipes_random_flip_mirrors_about_half_the_examples_exactly():
    n = 600
    data = dataset(n)
    setup = train.Setup(recipe(), data)
    assert setup.config.data.augment and setup.config.data.flip == "random"
    key = jax.random.fold_in(setup.aug_key, 0)  # the augmentation key of step 0, as the train step folds it
    out = np.asarray(setup.preprocess_fn(data.train_images, key=key, positions=jnp.arange(n)))
    pixels = out.astype(np.float64) * STD + MEAN  # exact: the normalisation is
    flips = [mirrored(pixels[i], data.train_images[i], setup.config.data.crop_padding) for i in range(n)]
    assert None not in flips, f"example {flips.index(None)} is not a crop of its image, mirrored or not"
    # A fair coin per example: Binomial(600, 1/2), sd 12.2; 4.5 sd either side, missed once in 10^5.
    assert 245 <= sum(flips) <= 355, f"{sum(flips)} of {n} examples mirrored"


# -------------------------------------------------------------------------- Nesterov


def test_the_recipes_optimizer_is_torchs_sgd_with_nesterov_momentum_and_l2_on_kernels(setup):
    """torch.optim.SGD(momentum=m, nesterov=True, weight_decay=wd), as its documentation defines
    it: d = g + wd * p; v = m * v + d; p -= lr * (d + m * v). The recipe decays conv and dense
    kernels only (configs/default.py), at the schedule's learning rate of each step."""
    config = setup.config
    assert config.nesterov and config.momentum > 0 and config.weight_decay > 0
    m, wd = config.momentum, config.weight_decay
    state = setup.fresh_state
    rng = np.random.default_rng(1)
    start = traverse_util.flatten_dict(jax.device_get(state.params))
    nesterov = {k: p.astype(np.float64) for k, p in start.items()}
    heavy_ball = dict(nesterov)  # plain momentum, p -= lr * v, for contrast
    v_nesterov = {k: 0.0 for k in start}
    v_heavy = {k: 0.0 for k in start}
    for step in range(3):  # the warmup's learning rates 0, peak / 4, peak / 2
        lr = float(setup.learning_rate_fn(step))
        grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in start.items()}
        state = state.apply_gradients(grads=traverse_util.unflatten_dict(grads))
        for k, g in grads.items():
            decay = wd if k[-1] == "kernel" else 0.0
            d = g + decay * nesterov[k]
            v_nesterov[k] = m * v_nesterov[k] + d
            nesterov[k] = nesterov[k] - lr * (d + m * v_nesterov[k])
            d = g + decay * heavy_ball[k]
            v_heavy[k] = m * v_heavy[k] + d
            heavy_ball[k] = heavy_ball[k] - lr * v_heavy[k]
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    for k, expected in nesterov.items():
        np.testing.assert_allclose(after[k], expected, rtol=1e-5, atol=1e-6, err_msg="/".join(k))
    # The two rules part far beyond that tolerance: the check tells Nesterov from plain momentum.
    assert max(np.abs(nesterov[k] - heavy_ball[k]).max() for k in start) > 1e-2


# ------------------------------------------------------------------------- BatchNorm


def test_the_recipes_batch_norm_keeps_torchs_running_statistics(setup):
    """torch's BatchNorm2d(momentum=0.1): running = 0.9 * running + 0.1 * batch statistic, for
    every BatchNorm of the model, through one train step. The step runs twice from running
    statistics that differ; the batch statistics do not depend on them, so the differences
    after the step are 0.9 times those before. For the first BatchNorm, fed the images
    themselves, the batch statistic is also computed here."""
    devices = jax.local_devices()[:1]
    state = setup.fresh_state
    params = traverse_util.flatten_dict(jax.device_get(state.params))
    # The stem conv copies input channel c % 3 to output channel c (its centre tap), exactly.
    kernel = np.zeros(params[("conv_init", "kernel")].shape, np.float32)
    channels = kernel.shape[-1]
    kernel[1, 1, np.arange(channels) % 3, np.arange(channels)] = 1.0
    params[("conv_init", "kernel")] = kernel
    params = traverse_util.unflatten_dict(params)
    rng = np.random.default_rng(2)
    stats = jax.device_get(state.batch_stats)
    before = [jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), stats) for _ in range(2)]
    step = setup.parallel_train_step(devices=devices)
    [batch] = setup.train_batches(0, 1, devices)
    after = []
    for running in before:
        replicated = setup.layout.replicate(
            setup.with_weights(state, {"params": params, "batch_stats": running}), devices
        )
        after.append(setup.layout.unreplicate(step(replicated, batch).batch_stats))
    flat = [traverse_util.flatten_dict(tree) for tree in (*before, *after)]
    assert len(flat[0]) == 2 * 20  # ResNet-18's BatchNorms: the stem's, 2 in each of 8 blocks, 3 projections'
    for name in flat[0]:
        np.testing.assert_allclose(
            flat[2][name] - flat[3][name], 0.9 * (flat[0][name] - flat[1][name]), rtol=0, atol=1e-6, err_msg=str(name)
        )
    images = (np.asarray(batch["image"][0], np.float64) - MEAN) / STD
    x = images[..., np.arange(channels) % 3]
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # flax keeps the biased variance
    running = traverse_util.flatten_dict(before[0])
    new = traverse_util.flatten_dict(after[0])
    np.testing.assert_allclose(new[("bn_init", "mean")], 0.9 * running[("bn_init", "mean")] + 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(new[("bn_init", "var")], 0.9 * running[("bn_init", "var")] + 0.1 * var, rtol=1e-5)


def test_the_resnet_heads_kernel_starts_as_torchs_linear(setup):
    """torch.nn.Linear's default init: weight U(-1/sqrt(fan_in), 1/sqrt(fan_in)); ResNet-18's
    head reads 512 features (8 x 64)."""
    kernel = np.asarray(jax.device_get(setup.fresh_state.params["head"]["kernel"]), np.float64)
    assert kernel.shape == (512, 10)
    bound = 1 / np.sqrt(512)
    largest = np.abs(kernel).max()
    assert 0.99 * bound < largest <= bound, f"largest |weight| {largest:.5f}, torch's bound {bound:.5f}"  # 5,120 draws
    # Uniform: variance bound^2 / 3 (the estimate's sd is 1.2% of it here) and kurtosis 1.8 (normal: 3).
    np.testing.assert_allclose(kernel.var(), bound**2 / 3, rtol=0.05)
    assert abs(kernel.mean()) < 4 * bound / np.sqrt(3 * kernel.size)
    kurtosis = np.mean((kernel - kernel.mean()) ** 4) / kernel.var() ** 2
    assert abs(kurtosis - 1.8) < 0.1, kurtosis


# ----------------------------------------------------------------------------- Mixup


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_mixups_weight_follows_beta_alpha_alpha(alpha):
    """Zhang et al. (2018): each mixed batch's weight lam ~ Beta(alpha, alpha); 4,000 steps' draws
    of the recipe's mix, with Mixup alone on every batch, against that law (Kolmogorov-Smirnov)."""
    setup = train.Setup(recipe(batch_size=16, mixup_alpha=alpha), dataset())
    lams = np.asarray(jax.vmap(lambda step: setup.mix_fn(step, 32, 32)[0])(jnp.arange(4000)), np.float64)
    test = scipy.stats.kstest(lams, scipy.stats.beta(alpha, alpha).cdf)
    var = 1 / (4 * (2 * alpha + 1))  # Beta(alpha, alpha)'s; its mean is 1/2
    assert test.pvalue > 1e-3, (
        f"KS {test.statistic:.3f}, p {test.pvalue:.2g}; mean {lams.mean():.3f} (0.5), "
        f"variance {lams.var():.4f} ({var:.4f})"
    )
