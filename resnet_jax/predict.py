"""`--mode predict`: the top-3 classes of image files, from a trained checkpoint. Each file becomes the
image the network trained on (`data.images.load_image`) and goes through eval's preprocessing, so a
CIFAR image saved as PNG is classified as `--mode eval` classifies it; a file that cannot be used gets
a one-line error and the others are still answered."""

import functools
import json
import sys

import jax
import numpy as np

from resnet_jax import evaluate, train
from resnet_jax.data.images import load_image
from resnet_jax.errors import Error


def predict_step(state, images, *, preprocess_fn, tta="none"):
    """Class probabilities of uint8 images, preprocessed and applied as in eval_step."""
    apply = functools.partial(state.apply_fn, train.eval_variables(state), train=False)
    return jax.nn.softmax(train.tta_logits(apply, preprocess_fn(images), tta))


def top3(probabilities: np.ndarray, class_names) -> list:
    """The three most probable classes, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:3]
    return [{"class": class_names[i], "probability": float(probabilities[i])} for i in order]


def classify(apply, state, images: dict, batch_size: int) -> dict:
    """The class probabilities of each of `images` (key: image), `batch_size` at a time."""
    keys = list(images)
    probabilities = {}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        probabilities.update(zip(chunk, np.asarray(apply(state, np.stack([images[k] for k in chunk])))))
    return probabilities


def predict_files(config, workdir: str, paths, as_json: bool = False, dataset=None) -> int:
    """Prints the top-3 classes of each image file (or why it failed); returns how many failed."""
    dataset, setup, state = evaluate.restore(config, workdir, dataset)

    images, errors = {}, {}
    size = dataset.train_images.shape[1]  # 32, or a folder data set's data.image_size
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path, size)
        except Error as e:
            errors[i] = str(e)
    apply = jax.jit(functools.partial(predict_step, preprocess_fn=setup.preprocess_fn, tta=config.eval_tta))
    probabilities = classify(apply, state, images, config.eval_batch_size)

    for i, path in enumerate(paths):
        if i in errors:
            if as_json:
                print(json.dumps({"file": path, "error": errors[i]}), flush=True)
            else:
                print(f"{path}: error: {errors[i]}", file=sys.stderr, flush=True)
        else:
            top = top3(probabilities[i], dataset.class_names)
            text = f"{path}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in top)
            print(json.dumps({"file": path, "top3": top}) if as_json else text, flush=True)
    return len(errors)
