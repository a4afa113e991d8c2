"""The PyTorch tutorial as written: ImageNet-stem ResNet-18, batch 4, SGD lr 0.001
momentum 0.9 (no Nesterov, no weight decay), 10 epochs, (x-0.5)/0.5, no augmentation.

Kept so users can see what the flagship recipe (configs/resnet18.py) improves.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.stem = "imagenet"
    config.model.sync_batch_norm = False
    config.data.augment = False
    config.data.normalization = "half"
    config.batch_size = 4
    config.eval_batch_size = 4
    config.learning_rate = 0.001
    config.base_batch_size = 4
    config.schedule = "constant"
    config.warmup_epochs = 0.0
    config.nesterov = False
    config.weight_decay = 0.0
    config.num_epochs = 10.0
    config.log_every_steps = 2000
    config.checkpoint_every_steps = 12500
    return config
