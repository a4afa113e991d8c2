"""CIFAR-100: the flagship recipe of configs/resnet18.py (ResNet-18 with the CIFAR stem, batch 512,
Nesterov SGD peaking at 0.2, weight decay 5e-4, warmup + cosine, label smoothing 0.1, crop + flip,
200 epochs) on the 100 fine classes."""

from configs import resnet18


def get_config():
    config = resnet18.get_config()
    config.data.name = (
        "cifar100"  # tfds cifar100: 50,000 train and 10,000 test images, its "label" (not "coarse_label")
    )
    return config
