"""He et al. (2016) CIFAR-10 recipe for ResNet-20: batch 128, lr 0.1, momentum 0.9,
weight decay 1e-4, lr divided by 10 at 50% and 75% of 164 epochs."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet20"
    config.batch_size = 128
    config.base_batch_size = 128
    config.nesterov = False
    config.weight_decay = 1e-4
    config.schedule = "piecewise"
    config.warmup_epochs = 0.0
    config.num_epochs = 164.0
    config.checkpoint_every_steps = 2000
    return config
