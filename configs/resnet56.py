"""He et al. (2016) CIFAR-10 recipe for ResNet-56: the same as configs/resnet20.py (batch 128,
lr 0.1, momentum 0.9, weight decay 1e-4, lr /10 at 50% and 75% of 164 epochs), deeper network."""

from configs import resnet20


def get_config():
    config = resnet20.get_config()
    config.model.name = "resnet56"
    return config
