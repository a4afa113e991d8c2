"""A short modern recipe for ResNet-20, the one docs/measurements.md's seed and EMA/TTA figures are
measured with: batch 128, Nesterov momentum, half an epoch of warmup then cosine decay
from a peak lr of 0.2, weight decay 5e-4, label smoothing 0.1, crop + flip, 3 epochs on
all 50,000 train images (no validation split: nothing is selected, the last step is reported)."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet20"
    config.batch_size = 128
    config.learning_rate = 0.2
    config.base_batch_size = 128
    config.label_smoothing = 0.1
    config.warmup_epochs = 0.5
    config.num_epochs = 3.0
    return config
