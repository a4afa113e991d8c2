"""Flagship CIFAR-10 recipe: ResNet-18 (CIFAR stem), aiming at 95% test accuracy.

SGD with Nesterov momentum, peak lr 0.2 at batch 512 (0.1 per 256 images, scaled
linearly), 1 warmup epoch then cosine decay, weight decay 5e-4 on kernels,
label smoothing 0.1, random crop + flip.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet18"
    config.model.stem = "cifar"
    config.batch_size = 512
    config.learning_rate = 0.1
    config.base_batch_size = 256
    config.schedule = "cosine"
    config.warmup_epochs = 1.0
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.num_epochs = 200.0
    return config
