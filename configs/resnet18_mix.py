"""The flagship recipe (configs/resnet18.py) plus CutMix, as Yun et al. (2019) train CIFAR:
CutMix with alpha 1 on every batch, for 300 epochs (their CIFAR schedule) instead of 200,
since a stronger regulariser needs longer training to pay off. Label smoothing 0.1 stays:
each one-hot is smoothed, then the two are mixed by the box's area. Its accuracy is not yet
measured: it waits for a GPU run.
"""

from configs import resnet18


def get_config():
    config = resnet18.get_config()
    config.cutmix_alpha = 1.0  # Yun et al.'s Beta(1, 1): the pasted area uniform in [0, 1]
    config.num_epochs = 300.0
    return config
