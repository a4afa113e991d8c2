"""The CPU build computes right under the project's XLA settings.

jaxlib 0.10.2's XLA:CPU returns wrong sums for a jitted vmap of a matrix-vector product followed
by a reduction (jax-ml/jax#39103), with and without the flag `resnet_jax/xla_flags.py` sets. Here
a child process applies `xla_flags.set_cpu_defaults()` before importing jax, as `run.py` does,
and jitted results are held against NumPy float64: that reproducer, and the train step's own
reductions (BatchNorm statistics over a batch on one device and synced over 8, a summed
cross-entropy). The same runs under jaxlib's default flags, which the rest of the suite uses.

Run as a script, this file prints the child's results as JSON.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
BATCH = (128, 32, 32, 64)  # ResNet-18's first activations at batch 128: 131,072 values per channel
LOSS_BATCH = 65_536  # past the sizes where #39103 goes wrong (16,385 rows in float64, 32,769 in float32)


def inputs():
    """The arrays both sides compute on (float32, as training)."""
    rng = np.random.default_rng(0)
    activations = (rng.standard_normal(BATCH) * 2.0 + 0.5).astype(np.float32)
    logits = (rng.standard_normal((LOSS_BATCH, 10)) * 3.0).astype(np.float32)
    labels = rng.integers(0, 10, LOSS_BATCH)
    return activations, logits, labels


def compute(project_flags: bool) -> dict:
    """The jitted results, in this process; call before jax is imported."""
    if project_flags:
        from resnet_jax import xla_flags

        xla_flags.set_cpu_defaults()
    import functools

    import jax
    import jax.numpy as jnp
    import jaxlib
    from flax import linen as nn

    from resnet_jax import train

    activations, logits, labels = inputs()
    results = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jaxlib": jaxlib.__version__}

    def batch_stats(x, axis_name=None):
        norm = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=1e-5, axis_name=axis_name)
        y, updates = norm.apply(norm.init(jax.random.key(0), x), x, mutable=["batch_stats"])
        stats = updates["batch_stats"]
        return stats["mean"], stats["var"], y

    mean, var, y = jax.jit(batch_stats)(activations)
    results.update(bn_mean=mean, bn_var=var, bn_out_sum=jnp.sum(y, axis=(0, 1, 2)))
    n = jax.device_count()
    shards = activations.reshape(n, -1, *BATCH[1:])
    mean, var, _ = jax.pmap(functools.partial(batch_stats, axis_name="i"), axis_name="i")(shards)
    results.update(synced_bn_mean=mean[0], synced_bn_var=var[0], devices=n)
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


@pytest.fixture(scope="module", params=["project", "jaxlib_default"])
def computed(request):
    """The child's results: with xla_flags.set_cpu_defaults() (as run.py), or with jaxlib's defaults."""
    environ = dict(os.environ)
    environ["XLA_FLAGS"] = " ".join(f for f in environ.get("XLA_FLAGS", "").split() if not f.startswith(FLAG))
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), request.param], env=environ, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert (FLAG in results["xla_flags"]) == (request.param == "project"), results["xla_flags"]
    return results


def test_jax_39103_reproducer(computed):
    for dtype, rows, rtol in (("float64", 16_385, 1e-15), ("float32", 32_769, 1e-7)):
        squares = np.arange(rows, dtype=np.float64) ** 2
        np.testing.assert_allclose(computed[f"squares_{dtype}"], squares, rtol=rtol, err_msg=dtype)


def test_batch_norm_statistics(computed):
    x = inputs()[0].astype(np.float64)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(computed["bn_mean"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(computed["bn_var"], var, rtol=2e-6)
    normalized = ((x - mean) / np.sqrt(var + 1e-5)).sum(axis=(0, 1, 2))  # ~0 per channel, 131,072 terms
    np.testing.assert_allclose(computed["bn_out_sum"], normalized, rtol=0, atol=0.05)


def test_batch_norm_statistics_synced_over_devices(computed):
    x = inputs()[0].astype(np.float64)
    assert computed["devices"] == 8
    np.testing.assert_allclose(computed["synced_bn_mean"], x.mean(axis=(0, 1, 2)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(computed["synced_bn_var"], x.var(axis=(0, 1, 2)), rtol=2e-6)


def test_summed_cross_entropy(computed):
    _, logits, labels = inputs()
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    log_sum_exp = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    loss = (log_sum_exp - z[np.arange(len(z)), labels]).sum()
    np.testing.assert_allclose(computed["loss_sum"], loss, rtol=1e-6)


if __name__ == "__main__":
    print(json.dumps(compute(project_flags=sys.argv[1] == "project")))
