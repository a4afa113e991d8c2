"""airbench's own code, trained on the CPU in float32 on this project's images: the reference
`configs/airbench93.py` and `configs/airbench94.py` are held against.

Writes airbench's `cifar10/train.pt` and `test.pt` into --workdir from the JPEG archive, shuffled
as `python -m resnet_jax.tfds_writer` writes the tfds splits (the whitening reads the first 5,000
train images), then runs airbench's `train93()` or `train94()` there, its device lines moved to the
CPU (`move_to_cpu`). Prints airbench's table (accuracy without and with its test-time augmentation;
total_time_seconds: training and the final evaluation), then wall_seconds. Run it under a Python
with torch and torchvision, this repository on PYTHONPATH:

    PYTHONPATH=. TORCH_VENV/bin/python benchmarks/airbench_reference.py --airbench AIRBENCH_CHECKOUT \\
        --archive ../shared/data/cifar10_jpeg.tar.xz --workdir /tmp/airbench [--model airbench93]
"""

import argparse
import os
import sys
import time


def write_splits(archive: str, folder: str) -> None:
    import numpy as np
    import torch

    from resnet_jax.data.tfds_format import CIFAR10_LABELS
    from resnet_jax.tfds_writer import read_archive

    os.makedirs(folder, exist_ok=True)
    for split, arrays in read_archive(archive, {"train": 0, "test": 0}).items():
        images, labels = torch.tensor(arrays["image"]), torch.tensor(np.asarray(arrays["label"], np.int64))
        torch.save({"images": images, "labels": labels, "classes": list(CIFAR10_LABELS)}, f"{folder}/{split}.pt")


def move_to_cpu() -> None:
    """airbench's device lines as no-ops or CPU equivalents: modules' `.half()` and `.cuda()`, tensors'
    `half()`, `torch.load`'s map_location, and `torch.cuda.Event` / `synchronize` (a perf_counter clock)."""
    import torch

    class Event:
        def record(self):
            self.at = time.perf_counter()

        def elapsed_time(self, end):
            return 1e3 * (end.at - self.at)

    load = torch.load
    torch.load = lambda *args, **kwargs: load(*args, **{**kwargs, "map_location": "cpu"})
    torch.nn.Module.half = lambda self: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.half = lambda self, *args, **kwargs: self.float()
    torch.cuda.Event = lambda **kwargs: Event()
    torch.cuda.synchronize = lambda *args, **kwargs: None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--airbench", required=True, help="a checkout of github.com/KellerJordan/cifar10-airbench")
    parser.add_argument("--archive", required=True, help="CIFAR-10 as JPEG folders (cifar10_jpeg.tar.xz)")
    parser.add_argument("--workdir", required=True, help="where cifar10/train.pt and test.pt are written")
    parser.add_argument("--model", default="airbench93", choices=("airbench93", "airbench94"))
    args = parser.parse_args()
    folder = os.path.join(args.workdir, "cifar10")
    if not os.path.exists(os.path.join(folder, "test.pt")):
        write_splits(args.archive, folder)
    move_to_cpu()
    sys.path.insert(0, args.airbench)
    import airbench
    import torch

    os.chdir(args.workdir)  # airbench reads cifar10/*.pt relative to the working directory
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    began = time.perf_counter()
    {"airbench93": airbench.train93, "airbench94": airbench.train94}[args.model]()
    print(f"wall_seconds {time.perf_counter() - began:.1f}", flush=True)


if __name__ == "__main__":
    main()
