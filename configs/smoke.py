"""A tiny network for a few hundred steps: first contact and end-to-end tests (well under
a minute on two CPU cores). Point data.data_dir at a small data set, for example one made by
`python -m resnet_jax.tfds_writer DIR --archive cifar10_jpeg.tar.xz --train 2000 --test 500`
(or `--synthetic` instead of `--archive ...` for learnable stand-in images)."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet8"
    config.model.num_filters = 8
    config.batch_size = 64
    config.eval_batch_size = 200
    config.base_batch_size = 64
    config.warmup_epochs = 0.5
    config.num_epochs = 8.0
    config.log_every_steps = 10
    config.eval_every_epochs = 4.0
    config.checkpoint_every_steps = 100
    return config
