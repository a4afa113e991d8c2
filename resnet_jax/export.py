"""`--mode export`: a trained checkpoint as StableHLO and a TensorFlow SavedModel in WORKDIR/export/, with
model.json: uint8 NHWC images in, float32 logits out, computed in float32 whatever the model trained in
(XLA:CPU runs float32 convolutions best); each is reloaded and checked against the Flax model
(docs/export.md). Only this module imports TensorFlow, and only for the SavedModel."""

import importlib.util
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import config_checks, evaluate, loop, train
from resnet_jax.data import pipeline
from resnet_jax.errors import Error, RunFailure

PARITY_ATOL = 1e-4  # largest |logit difference| an export may show against the Flax model
PARITY_EXAMPLES = 256  # the first test images each export must match the Flax model on
# Lowered for every platform, so that a file exported on the CPU also serves on a GPU or TPU;
# the module is the same for all four, so this costs little (docs/measurements.md).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FILES = {"stablehlo": "model.stablehlo", "savedmodel": "saved_model"}
SAVEDMODEL_CHUNK = 32  # the SavedModel's fixed batch where TensorFlow cannot read a symbolic one


def serving_function(model, variables, mean, std):
    """uint8 NHWC images -> float32 logits: eval's preprocessing and the model in eval mode."""

    def serve(images):
        return model.apply(variables, pipeline.preprocess(images, mean, std, jnp.float32), train=False)

    return serve


def export_stablehlo(serve, image_shape, path):
    """Serialises `serve` with jax.export for a symbolic batch; returns a callable reloaded from the file."""
    from jax import export as jax_export

    images = jax.ShapeDtypeStruct(jax_export.symbolic_shape("batch") + image_shape, jnp.uint8)
    exported = jax_export.export(jax.jit(serve), platforms=PLATFORMS)(images)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    with open(path, "rb") as f:
        reloaded = jax_export.deserialize(bytearray(f.read()))
    return lambda images: np.asarray(reloaded.call(images))


def export_savedmodel(serve, image_shape, path):
    """Converts `serve` with jax2tf into a SavedModel for any batch size; returns its reloaded signature.
    Where TensorFlow cannot read jax's symbolic-batch module, the SavedModel runs fixed chunks of
    SAVEDMODEL_CHUNK images (docs/export.md); drop that fallback once every supported TensorFlow can."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        run = _savedmodel(serve, image_shape, path, chunk=None)
        run(np.zeros((1, *image_shape), np.uint8))  # TensorFlow deserialises the module on the first call
        return run
    except tf.errors.InvalidArgumentError as e:
        if "Cannot deserialize computation" not in str(e):
            raise
    logging.info(
        f"TensorFlow {tf.__version__} cannot run jax {jax.__version__}'s symbolic-batch module; "
        f"the SavedModel runs batches of {SAVEDMODEL_CHUNK}, padding the last"
    )
    return _savedmodel(serve, image_shape, path, chunk=SAVEDMODEL_CHUNK)


def _savedmodel(serve, image_shape, path, chunk):
    """The SavedModel of `serve` for a symbolic batch (chunk None) or in fixed chunks of `chunk` images."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    options = {"with_gradient": False, "native_serialization_platforms": PLATFORMS}
    if chunk is None:
        call = jax2tf.convert(serve, polymorphic_shapes=["(batch, _, _, _)"], **options)
    else:
        converted = jax2tf.convert(serve, **options)  # traced at the chunk's static shape
        logits_shape = jax.eval_shape(serve, jax.ShapeDtypeStruct((chunk, *image_shape), jnp.uint8)).shape

        def call(images):
            count = tf.shape(images)[0]
            padded = tf.pad(images, [[0, (-count) % chunk]] + [[0, 0]] * len(image_shape))
            chunks = tf.reshape(padded, (-1, chunk, *image_shape))
            logits = tf.map_fn(converted, chunks, fn_output_signature=tf.TensorSpec(logits_shape, tf.float32))
            return tf.reshape(logits, (-1, logits_shape[-1]))[:count]

    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"logits": call(images)},
        input_signature=[tf.TensorSpec((None,) + image_shape, tf.uint8, name="images")],
        autograph=False,
    )
    shutil.rmtree(path, ignore_errors=True)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    signature = tf.saved_model.load(path).signatures["serving_default"]
    return lambda images: signature(images=tf.constant(images))["logits"].numpy()


EXPORTERS = {"stablehlo": export_stablehlo, "savedmodel": export_savedmodel}


def check_packages(formats) -> None:
    """An Error, before any work, when the SavedModel's TensorFlow is not installed."""
    if "savedmodel" in formats and importlib.util.find_spec("tensorflow") is None:
        raise Error(
            "exporting savedmodel needs tensorflow: pip install -e '.[export]' "
            "(or leave savedmodel out of --config.export_formats)"
        )


def parity(name, exported, reference, path) -> dict:
    """How the export's logits compare with the Flax model's; a RunFailure past PARITY_ATOL."""
    if exported.shape != reference.shape:
        raise RunFailure(f"the {name} export in {path} returns logits of shape {exported.shape}, not {reference.shape}")
    difference = float(np.max(np.abs(exported - reference)))
    agreement = float(np.mean(exported.argmax(-1) == reference.argmax(-1)))
    if not (difference <= PARITY_ATOL and agreement == 1.0):
        raise RunFailure(
            f"the {name} export in {path} does not match the Flax model on {len(reference)} test images "
            f"(max |logit difference| {difference:.3g}, limit {PARITY_ATOL};"
            f" top-1 agreement {agreement:.2%}); do not use it"
        )
    return {"max_abs_logit_difference": difference, "top1_agreement": agreement}


def export_checkpoint(config, workdir: str, dataset=None) -> dict:
    """Writes the formats `config.export_formats` names, each checked against the Flax model, and model.json
    to WORKDIR/export/; returns model.json's contents (None on the other processes of a multi-host run)."""
    formats = config_checks.export_formats(config)
    check_packages(formats)
    dataset, setup, state = evaluate.restore(config, workdir, dataset)
    step = int(state.step)
    # The exported function is one plain forward pass: its accuracy is evaluated without test-time augmentation.
    p_eval_step, replicated = setup.parallel_eval_step(tta="none"), setup.layout.replicate(state)
    result = loop.evaluate_split(setup, p_eval_step, replicated, dataset.test_images, dataset.test_labels)
    if jax.process_index() != 0:  # Every process evaluates; one writes.
        return None
    logging.info(
        "exporting the checkpoint at step %d (test accuracy %.4f) as %s", step, result["accuracy"], ", ".join(formats)
    )

    mean, std = pipeline.normalization(config.data, dataset)
    model = setup.model.clone(dtype=jnp.float32, axis_name=None)
    serve = serving_function(model, train.eval_variables(state), mean, std)
    image_shape = tuple(dataset.test_images.shape[1:])
    images = dataset.test_images[:PARITY_EXAMPLES]
    reference = np.asarray(jax.jit(serve)(images))

    folder = os.path.join(workdir, "export")
    os.makedirs(folder, exist_ok=True)
    exports = {}
    for name in formats:
        path = os.path.join(folder, FILES[name])
        run = EXPORTERS[name](serve, image_shape, path)
        exports[name] = {"path": FILES[name], **parity(name, np.asarray(run(images)), reference, path)}

    report = {
        "model": config.model.name,
        "class_names": list(dataset.class_names),
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": [None, *image_shape],
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
            "batch": "any size",
        },
        "output": {
            "name": "logits",
            "dtype": "float32",
            "shape": [None, dataset.num_classes],
            "meaning": "unnormalised class scores; softmax for probabilities",
        },
        "normalization": {
            "applied": "inside the model: (image - mean) / std per channel, on 0-255 pixels",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        },
        "checkpoint": {
            "workdir": os.path.abspath(workdir),
            "step": step,
            "test_accuracy": result["accuracy"],
            "test_examples": result["num_examples"],
            "data": config.data.name,
        },
        "parity": {"test_images": len(images), "atol": PARITY_ATOL},
        "exports": exports,
    }
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def print_report(report: dict, workdir: str) -> None:
    """`--mode export`'s lines: each export and its parity, then the checkpoint and model.json."""
    if not report:
        return
    for name, result in report["exports"].items():
        print(
            f"export: {name}: {os.path.join(workdir, 'export', result['path'])} (max |logit difference| "
            f"{result['max_abs_logit_difference']:.2g} on {report['parity']['test_images']} test images, same top-1)"
        )
    checkpoint = report["checkpoint"]
    print(
        f"export: step {checkpoint['step']} (test accuracy {checkpoint['test_accuracy']:.4f}); "
        f"wrote {os.path.join(workdir, 'export', 'model.json')}"
    )
