"""PyTorch's training images/s of the network the JAX trainer trains: the tutorial's ResNet, block fixed.

The block is fixed as in `resnet_jax.models`: bias-free convs, and a 1x1 strided conv + BatchNorm
shortcut where the shape changes; module names follow torchvision, so state_dicts convert with
`resnet_jax.convert.torch_to_flax`. train_images_per_sec: the median over --repeats timings of --steps
SGD steps on a fixed random batch, channels_last (`torch.compile` on CUDA, autocast for bfloat16).

    python benchmarks/torch_reference.py --stem cifar --batch-size 128 [--dtype bfloat16] [--json]
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection."""

    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """The tutorial's ResNet; stem "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv)."""

    def __init__(self, layers, num_classes=1000, stem="imagenet"):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.in_channels = 64
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, out_channels, blocks, stride=1):
        """A stage of `blocks` blocks; the first one strides and carries the projection shortcut."""
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            shortcut = nn.Conv2d(self.in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
            downsample = nn.Sequential(shortcut, nn.BatchNorm2d(out_channels))
        layers = [BasicBlock(self.in_channels, out_channels, stride, downsample)]
        self.in_channels = out_channels
        layers += [BasicBlock(out_channels, out_channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(name="resnet18", num_classes=10, stem="imagenet"):
    """The reference ResNet `name` ("resnet18" or "resnet34")."""
    return ResNet(LAYERS[name], num_classes=num_classes, stem=stem)


def resolve_device(device=None):
    """`device` as a torch.device; None: CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def training_step(stem="cifar", batch_size=128, dtype="float32", device=None, model="resnet18", net=None):
    """(step, sync): one SGD step of ResNet `model` (or of the module `net`) on a fixed random CIFAR-10 batch;
    a wait for the device."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    device = resolve_device(device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    # channels_last: the fast conv layout on CPU (oneDNN) and on CUDA tensor cores alike.
    if net is None:
        net = resnet(model, num_classes=10, stem=stem)
    net = net.to(device, memory_format=torch.channels_last).train()
    # Weight decay on conv and dense kernels only, as the JAX trainer.
    decay = [p for p in net.parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for p in net.parameters() if p.ndim <= 1 and p.requires_grad]
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    forward = torch.compile(net) if device.type == "cuda" else net
    images = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step, sync


def train_images_per_sec(
    stem="cifar", batch_size=128, steps=20, dtype="float32", device=None, model="resnet18", repeats=5, warmup=3
):
    """Median training images/s over `repeats` timings of `steps` SGD steps on random 32x32 CIFAR-10 batches."""
    step, sync = training_step(stem, batch_size, dtype, device, model)
    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(batch_size * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(LAYERS))
    parser.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation on CUDA)")
    parser.add_argument("--device", default=None, help="'cpu' or 'cuda'; default: cuda if available")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    rate = train_images_per_sec(
        args.stem, args.batch_size, args.steps, args.dtype, args.device, args.model, args.repeats, args.warmup
    )
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings = {k: v for k, v in vars(args).items() if k not in ("device", "json")}
    result = {"framework": "pytorch", "torch_version": torch.__version__, "backend": device.type, "device": name}
    result.update(settings, num_threads=torch.get_num_threads(), train_images_per_sec=round(rate, 1))
    if not args.json:
        print(
            f"{args.model} ({args.stem} stem) {args.dtype} batch {args.batch_size} on {name}: {rate:.1f} train images/s"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
