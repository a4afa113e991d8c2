"""David Page's ResNet-9 recipe (DAWNBench 2018, "How to train your ResNet"), aiming at 94%
test accuracy in 24 epochs.

His 24-epoch run (cifar10-fast's dawn.py): batch 512, Nesterov SGD 0.9, lr 0 -> 0.4 at
epoch 5 -> 0 at epoch 24, weight decay 5e-4, random crop of a 4-pixel reflect padding + flip
+ 8x8 Cutout. From his bag of tricks: label smoothing 0.2, evaluation with an exponential
moving average of the weights, and test-time augmentation.

His batch, momentum, weight decay and crop + flip are configs/default.py's (his 5e-4 x 512 on
a summed loss at lr 0.4 / 512 is the same step; kernels only here).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet9"
    config.model.dtype = "bfloat16"  # on a CPU pass --config.model.dtype=float32: bf16 is emulated there
    config.data.cutout = 8  # Page's 8x8 Cutout
    config.num_epochs = 24.0
    config.learning_rate = 0.4  # the peak, reached at epoch 5
    config.base_batch_size = 512
    config.warmup_epochs = 5.0  # then cosine to 0 at epoch 24: stands in for Page's piecewise-linear schedule
    config.label_smoothing = 0.2  # Page's bag of tricks ("very roughly hand-optimised")
    config.ema_decay = (
        0.99  # ~100 steps averaged, about the last epoch (97 steps): Page's 0.99 (as 0.99^5 every 5 steps)
    )
    config.eval_tta = "flip_translate"  # the flip and shifted copies (Page's bag of tricks: the flip alone)
    config.eval_every_epochs = 4.0
    return config
