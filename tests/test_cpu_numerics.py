"""The CPU build computes right under the project's XLA settings.

jaxlib 0.10.2's XLA:CPU returns wrong sums for a jitted vmap of a matrix-vector product followed
by a reduction (jax-ml/jax#39103), with and without the flags `resnet_jax/xla_flags.py` sets. Here
a child process applies `xla_flags.set_cpu_defaults(dtype)` before jax starts, as `run.py` does,
for each flag set the project turns on (float32's, and bfloat16's, which adds oneDNN on CPUs with
bfloat16 instructions), and under jaxlib's defaults, which the rest of the suite uses; jitted
float32 results are held against NumPy float64: that reproducer, and the train step's own
reductions (the BatchNorm statistics and output of the resnet18 recipe's model in train mode,
through the device layout on one device and synced over 8; a summed cross-entropy).

Run as a script, this file prints the child's results as JSON.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The flags xla_flags sets: float32's, then bfloat16's oneDNN one.
FLAGS = tuple(f"--{name}" for name in (*xla_flags.CPU_DEFAULTS, *xla_flags.BFLOAT16_DEFAULTS))
BATCH = (128, 32, 32, 3)  # images at batch 128: ResNet-18's first BatchNorm sees 131,072 values per channel
FILTERS = 64  # ResNet-18's first BatchNorm's channels
LOSS_BATCH = 65_536  # past the sizes where #39103 goes wrong (16,385 rows in float64, 32,769 in float32)


def inputs():
    """The arrays both sides compute on (float32, as training)."""
    rng = np.random.default_rng(0)
    images = (rng.standard_normal(BATCH) * 2.0 + 0.5).astype(np.float32)
    logits = (rng.standard_normal((LOSS_BATCH, 10)) * 3.0).astype(np.float32)
    labels = rng.integers(0, 10, LOSS_BATCH)
    return images, logits, labels


def stem_taps():
    """The one nonzero tap of the stem conv for each output channel: (dy, dx, input channel), all
    27 in turn. Each output channel is then one input channel shifted (zero at the border), exactly."""
    return [(t // 9, t // 3 % 3, t % 3) for t in (c % 27 for c in range(FILTERS))]


def activations():
    """The first BatchNorm's input in float64: `stem_taps` of the images."""
    padded = np.pad(inputs()[0].astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = BATCH[1:3]
    return np.stack([padded[:, dy : dy + height, dx : dx + width, c] for dy, dx, c in stem_taps()], axis=-1)


def compute(flag_set: str) -> dict:
    """The jitted results, in this process, under `flag_set`: a dtype whose project flags to set, or
    "jaxlib_default"; call before jax starts its backend."""
    if flag_set != "jaxlib_default":
        xla_flags.set_cpu_defaults(flag_set)
    import functools

    import jax
    import jax.numpy as jnp
    import jaxlib

    from configs import resnet18
    from resnet_jax import parallel, train

    images, logits, labels = inputs()
    results = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jaxlib": jaxlib.__version__}

    # The recipe's model (sync BatchNorm) in train mode through the device layout: the stem conv
    # made `stem_taps`, its BatchNorm at torch's init (scale 1, bias 0) with running statistics 0,
    # which the pass sets to torch's momentum 0.1 times the batch's. XLA drops the later layers.
    config = resnet18.get_config()
    model = train.create_model(config, 10)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images[:1])
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    kernel = variables["params"]["conv_init"]["kernel"]
    for c, (dy, dx, channel) in enumerate(stem_taps()):
        kernel[dy, dx, channel, c] = 1.0
    variables["params"]["bn_init"]["scale"][:] = 1.0

    def first_batch_norm(variables, x):
        _, state = model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: module.name == "bn_init",
        )
        stats = state["batch_stats"]["bn_init"]
        return (
            stats["mean"] / 0.1,
            stats["var"] / 0.1,
            jax.lax.psum(jnp.sum(state["intermediates"]["bn_init"]["__call__"][0], (0, 1, 2)), parallel.AXIS),
        )

    layout = parallel.layout(config.parallel)
    for prefix, devices in (("bn", jax.local_devices()[:1]), ("synced_bn", jax.local_devices())):
        shards = images.reshape(len(devices), -1, *BATCH[1:])
        out = layout.map_step(first_batch_norm, devices)(layout.replicate(variables, devices), shards)
        mean, var, out_sum = layout.unreplicate(out)
        results.update({f"{prefix}_mean": mean, f"{prefix}_var": var, f"{prefix}_out_sum": out_sum})
    results["devices"] = len(devices)
    results["loss_sum"] = jax.jit(lambda z, t: jnp.sum(train.cross_entropy(z, t, 10)))(logits, labels)

    jax.config.update("jax_enable_x64", True)

    def sum_of_squares(dtype, rows):  # jax-ml/jax#39103's reproducer; row i is (i, 0, 0)
        i = jnp.arange(rows, dtype=dtype)
        x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
        matrix = jnp.eye(3, dtype=dtype)
        return jax.jit(jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2)))(x)

    results["squares_float64"] = sum_of_squares(jnp.float64, 16_385)
    results["squares_float32"] = sum_of_squares(jnp.float32, 32_769)
    return {k: np.asarray(v).tolist() if hasattr(v, "shape") else v for k, v in results.items()}


@pytest.fixture(scope="module", params=["float32", "bfloat16", "jaxlib_default"])
def computed(request):
    """The child's results: with xla_flags.set_cpu_defaults(dtype) (as run.py), or with jaxlib's defaults."""
    environ = dict(os.environ)
    environ["XLA_FLAGS"] = " ".join(f for f in environ.get("XLA_FLAGS", "").split() if not f.startswith(FLAGS))
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), request.param], env=environ, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert (FLAGS[0] in results["xla_flags"]) == (request.param != "jaxlib_default"), results["xla_flags"]
    onednn = request.param == "bfloat16" and xla_flags.cpu_bfloat16_support() is not None
    assert (FLAGS[1] in results["xla_flags"]) == onednn, results["xla_flags"]
    return results


def test_jax_39103_reproducer(computed):
    for dtype, rows, rtol in (("float64", 16_385, 1e-15), ("float32", 32_769, 1e-7)):
        squares = np.arange(rows, dtype=np.float64) ** 2
        np.testing.assert_allclose(computed[f"squares_{dtype}"], squares, rtol=rtol, err_msg=dtype)


def batch_norm(x):
    """The batch's mean and (biased, as flax keeps it) variance per channel, and the per-channel
    sums of the normalised batch (~0, each of 131,072 terms), in float64."""
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return mean, var, ((x - mean) / np.sqrt(var + 1e-5)).sum(axis=(0, 1, 2))


@pytest.mark.parametrize("prefix", ["bn", "synced_bn"])
def test_batch_norm_statistics(computed, prefix):
    """On one device, and synced over 8 (each normalising by the whole batch's statistics)."""
    mean, var, normalized_sum = batch_norm(activations())
    assert computed["devices"] == 8
    np.testing.assert_allclose(computed[f"{prefix}_mean"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(computed[f"{prefix}_var"], var, rtol=2e-6)
    np.testing.assert_allclose(computed[f"{prefix}_out_sum"], normalized_sum, rtol=0, atol=0.05)


def test_summed_cross_entropy(computed):
    _, logits, labels = inputs()
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    log_sum_exp = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    loss = (log_sum_exp - z[np.arange(len(z)), labels]).sum()
    np.testing.assert_allclose(computed["loss_sum"], loss, rtol=1e-6)


if __name__ == "__main__":
    print(json.dumps(compute(sys.argv[1])))
