"""The model zoo: shapes, exact parameter counts, BatchNorm state, dtypes, registry."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, traverse_util

from resnet_jax import models

# torchvision / He et al. reference parameter counts with num_classes=10.
REFERENCE_COUNTS = [
    ("resnet18", "cifar", 11_173_962),
    ("resnet18", "imagenet", 11_181_642),
    ("resnet34", "cifar", 21_282_122),
    ("resnet50", "cifar", 23_520_842),
    ("resnet101", "cifar", 42_512_970),
    ("resnet20", None, 269_722),
    ("resnet32", None, 464_154),
    ("resnet56", None, 853_018),
    ("resnet110", None, 1_727_962),
    ("resnet9", None, 6_573_120),  # David Page's cifar10-fast net (PyTorch)
]


def abstract_variables(model):
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("name,stem,expected", REFERENCE_COUNTS)
def test_parameter_counts_match_reference(name, stem, expected):
    model = models.get_model(name, num_classes=10, **({"stem": stem} if stem else {}))
    assert models.num_params(abstract_variables(model)["params"]) == expected


def test_resnet9_has_pages_bias_free_layers():
    model = models.get_model("resnet9", num_classes=10)
    params = traverse_util.flatten_dict(abstract_variables(model)["params"])
    head = params.pop(("head", "kernel")).size
    convs = sum(v.size for k, v in params.items() if k[-1] == "kernel")
    norms = sum(v.size for k, v in params.items() if k[-1] in ("scale", "bias"))
    # Page's split: 6,563,520 in the 8 conv kernels, 4,480 in the 8 BatchNorms, a 512x10 head.
    assert (convs, norms, head) == (6_563_520, 4_480, 5_120)
    assert len(params) == 8 + 2 * 8  # and nothing else: no conv or head bias


def test_resnet9_residuals_start_as_identities_with_zero_init_residual():
    model = models.get_model("resnet9", num_classes=10, num_filters=4, zero_init_residual=True)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["params"]["layer1_residual"]["bn1"]["scale"], 1.0)
    apply = functools.partial(model.apply, train=False, capture_intermediates=True, mutable=["intermediates"])
    _, state = jax.jit(apply)(variables, x)
    hidden = state["intermediates"]
    for layer in ("layer1", "layer3"):
        np.testing.assert_array_equal(variables["params"][f"{layer}_residual"]["bn2"]["scale"], 0.0)
        pooled = nn.max_pool(nn.relu(hidden[f"{layer}_bn"]["__call__"][0]), (2, 2), strides=(2, 2))
        np.testing.assert_array_equal(hidden[f"{layer}_residual"]["__call__"][0], pooled)


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_maps_32x32_images_to_logits(name):
    model = models.get_model(name, num_classes=7)
    variables = abstract_variables(model)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    # Compiled, as the zoo marker promises (XLA, not only shape inference), from abstract
    # arguments: no weights are made. The eval forward pass, the cheapest whole-model program.
    compiled = jax.jit(functools.partial(model.apply, train=False)).lower(variables, images).compile()
    logits = compiled.out_info
    chex.assert_shape(logits, (2, 7))
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_small_resnet_runs_forward_with_both_stems(stem):
    model = models.get_model("resnet18", num_classes=10, stem=stem, num_filters=4)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    logits = model.apply(variables, x, train=False)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)


def tiny_model(**kw):
    return models.get_model("resnet8", num_classes=10, num_filters=4, **kw)


def test_batch_norm_statistics_update_in_train_mode_only():
    model = tiny_model()
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3)) * 3 + 1
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree_util.tree_map(
        lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"]
    )
    assert all(jax.tree_util.tree_leaves(changed))
    # Eval mode uses the running statistics and leaves them untouched.
    logits, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(state["batch_stats"], variables["batch_stats"])
    # ... and so its output does not depend on the rest of the batch.
    chex.assert_trees_all_close(model.apply(variables, x[:1], train=False), logits[:1], atol=1e-5)


def test_backward_pass_recomputes_each_block_from_its_conv_outputs():
    model = tiny_model()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return logits.sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr
    remats = [e for e in jaxpr.eqns if e.primitive.name == "remat2"]  # jax.checkpoint's primitive
    # One rematerialised region per residual block, saving only dot/conv outputs.
    assert len(remats) == sum(model.stage_sizes)
    assert all(e.params["policy"] is jax.checkpoint_policies.dots_saveable for e in remats)


def test_bfloat16_computes_in_bf16_with_float32_params_and_stats():
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    f32 = tiny_model()
    bf16 = tiny_model(dtype=jnp.bfloat16)
    variables = bf16.init(jax.random.key(0), x, train=False)
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == jnp.float32
    _, updates = bf16.apply(variables, x, train=True, mutable=["batch_stats"])
    for leaf in jax.tree_util.tree_leaves(updates):
        assert leaf.dtype == jnp.float32
    hidden = jax.eval_shape(lambda v, x: bf16.apply(v, x, train=False, capture_intermediates=True)[1], variables, x)
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(hidden))
    # Same weights: bf16 logits close to the float32 ones.
    ref = f32.apply(variables, x, train=False)
    out = bf16.apply(variables, x, train=False)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()) + 1e-3)


def init_params(model):
    # Not jitted: op by op is faster here than compiling a whole ResNet-18 init.
    return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]


def test_kaiming_fan_out_init_and_zero_init_residual():
    params = init_params(models.get_model("resnet18", num_classes=10, stem="cifar", zero_init_residual=True))
    # Kernels whose fan_in and fan_out differ (the widening convs and the projection), so that
    # only fan_out's variance fits: torch's kaiming_normal_(mode="fan_out"), 2 / (kh * kw * out).
    # A fan_in init has twice that variance here, far outside the 10%.
    for block, conv in [("stage2_block1", "conv1"), ("stage2_block1", "proj_conv"), ("stage3_block1", "conv1")]:
        kernel = np.asarray(params[block][conv]["kernel"], np.float64)
        kh, kw, fan_in_channels, out_channels = kernel.shape
        assert fan_in_channels != out_channels
        variance = kernel.var()
        np.testing.assert_allclose(variance, 2.0 / (kh * kw * out_channels), rtol=0.1, err_msg=f"{block}/{conv}")
        assert abs(kernel.mean()) < 0.05 * np.sqrt(variance)
        # Normal, not uniform (kurtosis 1.8) nor truncated normal (2.4 when cut at 2 sigma).
        kurtosis = np.mean((kernel - kernel.mean()) ** 4) / variance**2
        assert abs(kurtosis - 3.0) < 0.25, (block, conv, kurtosis)
    np.testing.assert_array_equal(params["stage2_block1"]["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(params["stage2_block1"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["stage2_block1"]["bn1"]["bias"], 0.0)
    default = init_params(models.get_model("resnet18", num_classes=10))
    np.testing.assert_array_equal(default["stage2_block1"]["bn2"]["scale"], 1.0)


def test_projection_shortcut_only_where_shape_changes():
    params = abstract_variables(models.get_model("resnet18", num_classes=10))["params"]
    with_proj = sorted(k for k, v in params.items() if "proj_conv" in v)
    assert with_proj == ["stage2_block1", "stage3_block1", "stage4_block1"]
    # He et al.'s option A shortcuts have no parameters at all.
    params = abstract_variables(models.get_model("resnet20", num_classes=10))["params"]
    assert not any("proj_conv" in v for v in params.values() if isinstance(v, dict))


def test_zero_pad_shortcut_subsamples_and_pads_channels():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = models.zero_pad_shortcut(x, 7, (2, 2))
    chex.assert_shape(y, (2, 2, 2, 7))
    np.testing.assert_array_equal(y[..., 2:5], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(y[..., :2], 0)
    np.testing.assert_array_equal(y[..., 5:], 0)


def test_get_model_rejects_unknown_names_listing_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18.*resnet20"):
        models.get_model("resnet19", num_classes=10)
