"""Using a trained model: --mode predict on image files, and --mode summary's table."""

import io
import json
import os
import re
import struct
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import resnet18, resnet20, smoke
from conftest import run_cli
from resnet_jax import checkpoints, models, predict, summary, train
from resnet_jax.data import images, registry
from resnet_jax.errors import Error

_smoke_runs = {}  # data_dir -> workdir


def smoke_run_workdir(data_dir, tmp_path_factory) -> str:
    """The workdir of a 30-step smoke run on `data_dir`, trained once per session (test_plots uses it too)."""
    if data_dir not in _smoke_runs:
        workdir = str(tmp_path_factory.mktemp("smoke_run"))
        result = run_cli(
            "--config",
            "configs/smoke.py",
            "--workdir",
            workdir,
            f"--config.data.data_dir={data_dir}",
            "--config.num_train_steps=30",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        _smoke_runs[data_dir] = workdir
    return _smoke_runs[data_dir]


# A 9-step smoke run that keeps a weight average (ema_decay 0.9) and holds out a validation split:
# evaluated and checkpointed every 3 steps (3 steps of the 8 in an epoch of 540 images).
AVERAGED_RUN = (
    "--config.data.validation_examples=100",
    "--config.ema_decay=0.9",
    "--config.num_train_steps=9",
    "--config.checkpoint_every_steps=3",
    "--config.log_every_steps=3",
    "--config.eval_every_epochs=0.375",
)
_averaged_runs = {}  # data_dir -> workdir


def averaged_run_workdir(data_dir, tmp_path_factory) -> str:
    """The workdir of the AVERAGED_RUN on `data_dir`, trained once per session on one device
    (test_finetune and test_export use it too)."""
    if data_dir not in _averaged_runs:
        workdir = str(tmp_path_factory.mktemp("averaged_run"))
        result = run_cli(
            *("--config", "configs/smoke.py", "--workdir", workdir, f"--config.data.data_dir={data_dir}"),
            *AVERAGED_RUN,
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        _averaged_runs[data_dir] = workdir
    return _averaged_runs[data_dir]


def averaged_run_config(data_dir):
    """The smoke config with AVERAGED_RUN's settings, as its --mode predict/export is given them."""
    config = smoke.get_config()
    config.data.data_dir = data_dir
    config.data.validation_examples, config.ema_decay = 100, 0.9
    return config


def checkpoint_weights(workdir) -> dict:
    """The newest checkpoint of `workdir` as orbax wrote it, read without a template:
    {"params": its variables, "ema": its weight average's (None without one)}."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)
    try:
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    finally:
        manager.close()
    return {
        "params": {"params": restored["params"], "batch_stats": restored["batch_stats"]},
        "ema": restored.get("ema") or None,
    }


def smoke_model_logits(variables, dataset, images, dtype=np.float32, tta="none"):
    """The smoke config's network (resnet8, 8 filters) in eval mode on uint8 `images`, normalised
    by the data set's statistics, computing in `dtype`, as float32 logits. tta="flip_translate"
    averages, as airbench's tta_level 2: half the image and its mirror, half the same over the
    image shifted a pixel either way diagonally (reflect padding)."""
    model = models.get_model("resnet8", num_classes=len(dataset.class_names), num_filters=8, dtype=dtype)
    x = (np.asarray(images, np.float32) - dataset.mean) / dataset.std

    def mirrored(x):
        logits = np.asarray(model.apply(variables, x, train=False), np.float32)
        if tta == "none":
            return logits
        return 0.5 * (logits + np.asarray(model.apply(variables, x[:, :, ::-1], train=False), np.float32))

    if tta != "flip_translate":
        return mirrored(x)
    height, width = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifted = 0.5 * (mirrored(padded[:, :height, :width]) + mirrored(padded[:, 2:, 2:]))
    return 0.5 * (mirrored(x) + shifted)


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def smoke_run(tiny_data_dir, tmp_path_factory):
    return smoke_run_workdir(tiny_data_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def config(tiny_data_dir):
    config = smoke.get_config()
    config.data.data_dir = tiny_data_dir
    return config


@pytest.fixture(scope="module")
def dataset(config):
    return registry.load_dataset(config.data)


@pytest.fixture(scope="module")
def eval_probabilities(smoke_run, config, dataset):
    """Eval mode's view of the test split: the restored checkpoint applied with train=False."""
    setup = train.Setup(config, dataset)
    manager = checkpoints.create_manager(smoke_run, config.keep_checkpoints, read_only=True)
    state = checkpoints.restore_for_eval(manager, setup.fresh_state, "latest")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, setup.preprocess_fn(dataset.test_images), train=False)
    return np.asarray(jax.nn.softmax(logits))


@pytest.fixture(scope="module")
def right_and_wrong(eval_probabilities, dataset):
    """Indices of test images the checkpoint classifies right (3) and wrong (2)."""
    correct = eval_probabilities.argmax(-1) == dataset.test_labels
    assert correct.sum() >= 3, "the smoke run learned nothing"
    return np.flatnonzero(correct)[:3], np.flatnonzero(~correct)[:2]


def save_pngs(dataset, indices, folder) -> list:
    paths = []
    for i in indices:
        path = folder / f"test_{i}.png"
        Image.fromarray(dataset.test_images[i]).save(path)
        paths.append(str(path))
    return paths


def save(image: Image.Image, tmp_path, name="image.png", **kwargs) -> str:
    path = str(tmp_path / name)
    image.save(path, **kwargs)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data (cheap decompression-bomb bait)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def predict_args(workdir, data_dir, *paths):
    return (
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        "--mode",
        "predict",
        *map(str, paths),
    )


# ------------------------------------------------------------------------ images -> 32x32 RGB


def test_a_cifar_png_round_trips_exactly(dataset, tmp_path):
    (path,) = save_pngs(dataset, [0], tmp_path)
    np.testing.assert_array_equal(images.load_image(path), dataset.test_images[0])


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (200, 0, 0, 0))
    la = Image.new("LA", (32, 32), (0, 128))
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    for image, kwargs, expected in (
        (rgba, {}, (255, 255, 255)),
        (la, {}, (127, 127, 127)),  # half-transparent black on white
        (palette, {"transparency": 1}, (255, 255, 255)),
        (palette, {}, (10, 20, 30)),
    ):
        pixels = images.load_image(save(image, tmp_path, **kwargs))
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        np.testing.assert_allclose(pixels, np.broadcast_to(expected, (32, 32, 3)), atol=1)


def test_grayscale_and_16_bit_grayscale_become_rgb(tmp_path):
    gray = images.load_image(save(Image.new("L", (32, 32), 100), tmp_path, "gray.png"))
    assert (gray == 100).all()
    sixteen = np.full((32, 32), 128 * 257, np.uint16)
    sixteen[:, 16:] = 65535
    pixels = images.load_image(save(Image.fromarray(sixteen), tmp_path, "sixteen.png"))
    assert (pixels[:, :16] == 128).all() and (pixels[:, 16:] == 255).all()  # scaled, not clipped at 255


def test_a_wide_photo_is_center_cropped_then_resized(tmp_path):
    pixels = np.zeros((320, 960, 3), np.uint8)
    pixels[..., 2] = 255  # blue sides
    pixels[:, 320:640] = (255, 0, 0)  # a red square in the middle
    result = images.load_image(save(Image.fromarray(pixels), tmp_path, "wide.jpg", quality=95))
    assert result.shape == (32, 32, 3)
    assert (np.abs(result[:, 2:-2].astype(int) - (255, 0, 0)) <= 8).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:16] = (255, 0, 0)  # red on top as stored...
    pixels[16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 3  # ...shown rotated by 180 degrees: blue on top
    result = images.load_image(save(Image.fromarray(pixels), tmp_path, "photo.jpg", exif=exif, quality=95))
    assert result[2, :, 2].min() > 200 and result[-3, :, 0].min() > 200


@pytest.mark.parametrize(
    "width, height, message",
    [
        (8000, 8000, "8000x8000 pixels is over the limit of 50,000,000"),  # ours
        (10000, 10000, "refused: Image size (100000000 pixels) exceeds limit"),  # Pillow's warning
        (20000, 20000, "refused: Image size (400000000 pixels) exceeds limit"),  # Pillow's error
    ],
)
def test_decompression_bombs_are_refused(tmp_path, width, height, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(Error, match=re.escape(message)):
        images.load_image(str(path))


def test_the_pixel_limit_is_a_module_constant(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (64, 64)), tmp_path)
    monkeypatch.setattr(images, "MAX_PIXELS", 4095)
    with pytest.raises(Error, match="64x64 pixels is over the limit of 4,095"):
        images.load_image(path)


def test_files_that_are_not_images_say_why(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    for path, message in (
        (text, "not an image file"),
        (truncated, "cannot read the image"),
        (tmp_path / "missing.png", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        with pytest.raises(Error, match=message):
            images.load_image(str(path))


# ------------------------------------------------------------------------ --mode predict


@pytest.mark.slow
def test_predict_json_agrees_with_eval_mode(
    smoke_run, tiny_data_dir, dataset, eval_probabilities, right_and_wrong, tmp_path
):
    right, wrong = right_and_wrong
    indices = np.concatenate([right, wrong])
    paths = save_pngs(dataset, indices, tmp_path)
    result = run_cli(*predict_args(smoke_run, tiny_data_dir, "--json", *paths))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == paths
    for line, i in zip(lines, indices):
        expected = np.argsort(-eval_probabilities[i])[:3]
        assert [t["class"] for t in line["top3"]] == [dataset.class_names[k] for k in expected]
        assert [t["probability"] for t in line["top3"]] == pytest.approx(eval_probabilities[i][expected], abs=1e-5)
    # The images eval mode gets right, predict names right.
    assert [line["top3"][0]["class"] for line in lines[: len(right)]] == [
        dataset.class_names[dataset.test_labels[i]] for i in right
    ]


@pytest.mark.slow
def test_bad_files_fail_alone_and_the_exit_code_is_1(
    smoke_run, tiny_data_dir, dataset, eval_probabilities, right_and_wrong, tmp_path
):
    good = save_pngs(dataset, right_and_wrong[0][:2], tmp_path)
    (tmp_path / "text.png").write_text("hello")
    jpeg = io.BytesIO()
    Image.fromarray(dataset.test_images[0]).resize((256, 256)).save(jpeg, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[:1000])
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    bad = [str(tmp_path / name) for name in ("text.png", "truncated.jpg", "bomb.png")]
    result = run_cli(*predict_args(smoke_run, tiny_data_dir, bad[0], good[0], bad[1], bad[2], good[1]))
    assert result.returncode == 1, result.stderr[-3000:]
    answers = result.stdout.splitlines()
    assert [a.split(": ")[0] for a in answers] == good
    top1 = [dataset.class_names[eval_probabilities[i].argmax()] for i in right_and_wrong[0][:2]]
    for answer, name in zip(answers, top1):
        assert answer.split(": ")[1].startswith(f"{name} ") and answer.count("%") == 3
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert [e.split(": error: ")[0] for e in errors] == bad
    assert "not an image file" in errors[0] and "cannot read the image" in errors[1] and "refused" in errors[2]


@pytest.mark.slow
def test_predict_errors_for_the_whole_run(config, dataset, smoke_run, tmp_path, capsys):
    with pytest.raises(Error, match="no checkpoint in"):
        predict.predict_files(config, str(tmp_path), ["any.png"], dataset=dataset)
    step_config = config.copy_and_resolve_references()
    step_config.eval_checkpoint_step = "7"
    with pytest.raises(Error, match="no checkpoint at step 7 .* available: 30"):
        predict.predict_files(step_config, smoke_run, ["any.png"], dataset=dataset)
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_predict_json_reports_errors_as_lines(config, dataset, smoke_run, tmp_path, capsys):
    text = tmp_path / "text.png"
    text.write_text("hello")
    good = save_pngs(dataset, [5], tmp_path)
    assert predict.predict_files(config, smoke_run, [str(text), *good], as_json=True, dataset=dataset) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"file": str(text), "error": "not an image file (Pillow cannot identify it)"}
    assert lines[1]["file"] == good[0] and len(lines[1]["top3"]) == 3
    assert sum(t["probability"] for t in lines[1]["top3"]) <= 1.0 + 1e-6


def predicted(config, workdir, dataset, paths, capsys) -> list:
    """--mode predict --json's answer for each of `paths`: (class indices, probabilities) of its top 3."""
    assert predict.predict_files(config, workdir, paths, as_json=True, dataset=dataset) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == paths
    return [
        ([dataset.class_names.index(t["class"]) for t in line["top3"]], [t["probability"] for t in line["top3"]])
        for line in lines
    ]


def largest_top3_difference(answers, probabilities) -> float:
    return max(np.abs(np.asarray(p) - probabilities[i][k]).max() for i, (k, p) in enumerate(answers))


@pytest.fixture(scope="module")
def averaged_run(tiny_data_dir, tmp_path_factory):
    return averaged_run_workdir(tiny_data_dir, tmp_path_factory)


@pytest.mark.slow
def test_predict_uses_the_weight_average(averaged_run, tiny_data_dir, tmp_path, capsys):
    config = averaged_run_config(tiny_data_dir)
    dataset = registry.load_dataset(config.data)
    indices = np.arange(50)
    answers = predicted(config, averaged_run, dataset, save_pngs(dataset, indices, tmp_path), capsys)
    weights = checkpoint_weights(averaged_run)
    images = dataset.test_images[indices]
    average, last = (softmax(smoke_model_logits(weights[k], dataset, images)) for k in ("ema", "params"))
    assert largest_top3_difference(answers, average) < 1e-5, "predict does not apply the weight average"
    assert largest_top3_difference(answers, last) > 1e-3  # the run's last weights are told apart


@pytest.mark.slow
def test_predict_averages_the_test_time_augmentations_eval_tta_names(config, dataset, smoke_run, tmp_path, capsys):
    indices = np.arange(50)
    paths = save_pngs(dataset, indices, tmp_path)
    variables = checkpoint_weights(smoke_run)["params"]
    images = dataset.test_images[indices]
    plain = softmax(smoke_model_logits(variables, dataset, images))
    for tta in ("flip", "flip_translate"):
        tta_config = config.copy_and_resolve_references()
        tta_config.eval_tta = tta
        answers = predicted(tta_config, smoke_run, dataset, paths, capsys)
        expected = softmax(smoke_model_logits(variables, dataset, images, tta=tta))
        assert largest_top3_difference(answers, expected) < 1e-5, f"predict ignores eval_tta={tta}"
        assert largest_top3_difference(answers, plain) > 1e-3  # the prediction without the views is told apart


# ------------------------------------------------------------------------ --mode summary


def reported_params(text: str) -> int:
    """The parameter total from model_table's closing lines."""
    line = next(line for line in text.splitlines() if "trained parameters" in line)
    return int(line.split(": ")[1].split(" trained")[0].replace(",", ""))


@pytest.mark.parametrize(
    "get_config, overrides, known",
    [
        (resnet20.get_config, {}, 269_722),  # He et al. 2016: 0.27M
        (resnet18.get_config, {"stem": "cifar"}, 11_173_962),  # the usual CIFAR ResNet-18
    ],
)
def test_summary_counts_the_registry_models_parameters(get_config, overrides, known):
    config = get_config()
    text = summary.model_table(config)
    model = models.get_model(config.model.name, num_classes=10, **overrides)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
    assert reported_params(text) == models.num_params(variables["params"]) == known
    assert "flops" in text and "stage3_block1" in text and "head" in text
    assert int(text.splitlines()[-1].split(": ")[1].replace(",", "")) > 0  # forward FLOPs per image


def test_summary_needs_no_data_and_follows_the_data_sets_classes(tmp_path):
    result = run_cli(
        "--config",
        "configs/resnet20.py",
        "--mode",
        "summary",
        "--config.data.name=cifar100",
        f"--config.data.data_dir={tmp_path / 'none'}",
        f"--config.data.archive={tmp_path / 'none.tar.gz'}",  # never downloads, should it load the data
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # ResNet-20's 269,722 parameters, with a 64x100 head instead of 64x10.
    assert reported_params(result.stdout) == 269_722 + 64 * 90 + 90
    assert "(100 classes, float32)" in result.stdout
    assert "\x1b[" not in result.stdout  # plain text, no terminal colours
