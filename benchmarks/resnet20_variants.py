"""Where a ~1-point gap to a plain JAX ResNet-20 comes from: configs/resnet20_3epochs.py
trained with flax's defaults in place of our choices, one at a time or all together.

    python benchmarks/resnet20_variants.py --data-dir D --variant plain --seed 0 --workdir W

Variants (ours: Kaiming fan_out conv init and torch's Linear init for the head, weight decay
on kernels only, BatchNorm momentum 0.9 as torch's 0.1):
  lecun_init    flax's default initialisers: lecun_normal kernels, zero head bias
  decay_all     weight decay on every parameter, BatchNorm scales and biases included
  bn_momentum   flax's default BatchNorm momentum 0.99
  plain         all three: what a ResNet-20 written with flax's defaults trains
Prints one JSON line: the variant, seed and final test accuracy (also in W/metrics.jsonl).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnet_jax import xla_flags  # noqa: E402

xla_flags.set_cpu_defaults()  # Before jax is imported.

from flax import linen as nn  # noqa: E402

from configs import resnet20_3epochs  # noqa: E402
from resnet_jax import loop, models, workdir as workdir_lib  # noqa: E402

VARIANTS = ("ours", "lecun_init", "decay_all", "bn_momentum", "plain")


def apply_variant(variant: str, config) -> None:
    if variant in ("lecun_init", "plain"):
        models.conv_kernel_init = nn.initializers.lecun_normal()
        models.dense_kernel_init = nn.initializers.lecun_normal()
    if variant in ("decay_all", "plain"):
        config.param_rules = ((".*", 1, 1, -1),)
    if variant in ("bn_momentum", "plain"):
        get_model = models.get_model
        models.get_model = lambda name, **kw: get_model(name, bn_momentum=0.99, **kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="tfds data_dir holding cifar10/3.0.2")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    config = resnet20_3epochs.get_config()
    apply_variant(args.variant, config)
    config.data.data_dir, config.seed = args.data_dir, args.seed
    workdir_lib.prepare(args.workdir)
    loop.train_and_evaluate(config, args.workdir)
    tests = [r for r in workdir_lib.read_metrics(os.path.join(args.workdir, "metrics.jsonl")) if r["split"] == "test"]
    print(
        json.dumps(
            {
                "variant": args.variant,
                "seed": args.seed,
                "step": tests[-1]["step"],
                "test_accuracy": tests[-1]["accuracy"],
            }
        )
    )


if __name__ == "__main__":
    main()
