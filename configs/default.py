"""Base configuration: every field, one line each. Other configs start from this one.

Derived quantities (steps per epoch, the learning rate scaled to the batch size,
total steps) are computed in code from these fields, never stored here.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet18"  # a name from resnet_jax.models.MODELS
    config.model.stem = "cifar"  # resnet18..152 only: "cifar" (3x3/1 conv) or "imagenet" (7x7/2 + max-pool)
    config.model.num_filters = config_dict.placeholder(int)  # width of the first stage; None: the model's own
    config.model.dtype = "float32"  # computation dtype, "float32" or "bfloat16"; params stay float32
    config.model.sync_batch_norm = True  # average BatchNorm statistics across all devices
    config.model.zero_init_residual = False  # start each residual branch's last BN scale at 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"  # tfds data set "cifar10" or "cifar100", or "folder": your images in data.folder
    config.data.folder = config_dict.placeholder(str)  # data.name="folder": DIR with train/<class>/, test/<class>/
    config.data.image_size = 32  # data.name="folder": images are centre-cropped square and resized to this side
    config.data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.validation_examples = 0  # train examples held out (balanced, fixed) to pick the best checkpoint
    config.data.archive = ""  # prepare from this copy of the official archive (cifar-10-binary.tar.gz) instead
    config.data.augment = True  # random crop + horizontal flip on the device
    config.data.crop_padding = 4  # pixels of padding around the image before the random 32x32 crop
    config.data.padding_mode = "reflect"  # "reflect" or "zero" padding for the crop
    config.data.flip = "random"  # "random": a fair draw per image and step, or "alternating" (docs/training.md)
    config.data.cutout = 0  # side of the Cutout square in pixels; 0: off
    config.data.normalization = "dataset"  # "dataset": per-channel mean/std of the train split; "half": (x-0.5)/0.5

    config.batch_size = 512  # global training batch, over all devices of all hosts
    config.eval_batch_size = 256  # global evaluation batch (a larger one raises peak memory: docs/measurements.md)
    config.num_epochs = 30.0  # length of training in epochs (ignored when num_train_steps > 0)
    config.num_train_steps = -1  # length of training in steps; -1: derived from num_epochs

    config.learning_rate = 0.1  # peak learning rate at batch size base_batch_size
    config.base_batch_size = 256  # the peak learning rate scales by batch_size / base_batch_size
    config.schedule = "cosine"  # "cosine", "piecewise", "onecycle" or "constant"
    config.warmup_epochs = 1.0  # linear warmup at the start of "cosine" and "constant"
    config.lr_drops = ((0.5, 0.1), (0.75, 0.1))  # "piecewise": (fraction of training, factor the lr is multiplied by)
    config.momentum = 0.9  # SGD momentum
    config.nesterov = True  # Nesterov momentum
    config.weight_decay = 5e-4  # L2 coefficient x param_rules' wd x; default rules: conv and dense kernels only
    config.param_rules = ((".*/kernel", 1, 1, -1), (".*", 1, 0, -1))  # 1st match: (regex, lr x, wd x, epochs; -1: all)
    config.label_smoothing = 0.0  # label smoothing of the cross-entropy targets
    config.mixup_alpha = 0.0  # Mixup's Beta(alpha, alpha) for the mixing weight; 0: off
    config.cutmix_alpha = 0.0  # CutMix's Beta(alpha, alpha) for the pasted box's area; 0: off (both on: one per batch)
    config.grad_clip_norm = 0.0  # clip gradients to this global norm; 0: off
    config.ema_decay = 0.0  # decay of the moving average of params and BN statistics that evaluation uses; 0: off
    config.lookahead_every = 0  # steps between airbench's lookahead moves of the weights to their average; 0: off
    config.eval_tta = "none"  # test-time augmentation in evaluation: "none", "flip" or "flip_translate"

    config.parallel = "pmap"  # device layout: "pmap" (jax.pmap, local devices) or "sharded" (jax.jit over a mesh)

    config.seed = 0  # seeds initialisation, data order and augmentation
    config.log_every_steps = 50  # steps between train metric records
    config.profile_steps = 0  # trace this many steps after the first (compiled) one into WORKDIR/profile/; 0: off
    config.eval_every_epochs = 1.0  # epochs between evaluations (and one at the end)
    config.checkpoint_every_steps = 1000  # steps between checkpoints (also saved at each evaluation and the end)
    config.keep_checkpoints = 3  # most recent checkpoints kept (plus the best by validation accuracy)
    config.eval_checkpoint_step = "latest"  # --mode eval/predict: "latest", "best" or a step number
    config.allow_config_change = False  # resume even if architecture, data set or batch size changed

    config.init_from = config_dict.placeholder(str)  # fine-tune from a WORKDIR or a torchvision .pt/.safetensors
    config.init_from_step = "latest"  # init_from a WORKDIR: its "latest", "best" or a step number
    config.export_formats = "stablehlo,savedmodel"  # --mode export: the formats written to WORKDIR/export/
    return config
