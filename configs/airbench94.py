"""Keller Jordan's airbench 94% recipe (arXiv 2404.00498; github KellerJordan/cifar10-airbench,
`airbench/lib_airbench94.py`): 94.01% mean test accuracy on CIFAR-10 in 9.9 epochs.

A 2x2 whitening conv computed from the first 5,000 train images and never trained; Nesterov
SGD with its hyperparameters (per 1,024 examples on the summed loss) written for the mean loss,
BatchNorm biases at 64x the learning rate, label smoothing 0.2; lookahead every 5 steps; alternating flip and 2-pixel
reflect translation; test-time augmentation with the mirror and 1-pixel shifts. How each piece
maps to airbench's code, and what was measured on the same images: docs/training.md.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "airbench94"
    config.data.crop_padding = 2  # airbench's translate: 2
    config.data.flip = "alternating"
    config.batch_size = 1024
    config.num_epochs = 9.9
    # airbench's SGD on the summed loss, its hyperparameters per 1,024 examples, as the mean loss's:
    kilostep = 1024 * (1 + 1 / (1 - 0.85))  # airbench's kilostep_scale at momentum 0.85
    config.momentum = 0.85
    config.base_batch_size = 1024
    config.learning_rate = 11.5 * 1024 / kilostep  # = 1.5: airbench's 11.5 per 1,024 examples on the summed loss
    config.weight_decay = 0.0153 / 11.5  # its decay 0.0153 x batch / kilostep over its lr 11.5 / kilostep, per example
    config.param_rules = (
        ("whiten/kernel", 1.0, 1.0, 0),  # computed from the train images, never trained
        ("whiten/bias", 1.0, 1.0, 3),  # whiten_bias_epochs
        (r"group\d_norm\d/bias", 64.0, 1 / 64, -1),  # bias_scaler: 64x the lr, the same decay per step
        (".*", 1.0, 1.0, -1),  # the decay on every trained parameter
    )
    config.schedule = "airbench"
    config.label_smoothing = 0.2
    config.lookahead_every = 5
    config.eval_tta = "flip_translate"  # airbench's tta_level 2
    config.eval_every_epochs = 9.9  # once, at the end
    return config
