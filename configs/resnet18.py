"""Flagship CIFAR-10 recipe: ResNet-18 (CIFAR stem), aiming at 95% test accuracy.

SGD with Nesterov momentum, peak lr 0.2 at batch 512 (0.1 per 256 images, scaled
linearly), 1 warmup epoch then cosine decay, weight decay 5e-4 on kernels,
label smoothing 0.1, random crop + flip. All of it is configs/default.py's but the
label smoothing and the 200 epochs.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.label_smoothing = 0.1
    config.num_epochs = 200.0
    return config
