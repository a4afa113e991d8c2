"""Step parity with airbench's own code: its network and ours from the same weights, trained on
the same batches by the recipe's optimizer, side by side.

airbench's side (`make_net93`/`94`, `init_whitening_conv`, its SGD groups, `get_lr`, `LookaheadState`
and loss, as its `train` builds them) runs under --torch-python from the --airbench checkout, its
`.half().cuda()` made no-ops (float32 on the CPU), whitened from our first 5,000 train images; ours
starts from its weights; both take the recipe's first --steps batches, unaugmented. Training is
chaotic, so the yardstick is airbench's gap to a copy of itself perturbed at float32's resolution
(weights x 1 +- 2^-23): exit 0 (PARITY) when ours stays within twice it, in loss and in parameters.
By design, airbench's lookahead average starts before the whitening init, ours (and this PyTorch
side's) after; PyTorch's BatchNorm keeps the unbiased running variance, flax's the biased one.

    python benchmarks/airbench_parity.py --airbench AIRBENCH_CHECKOUT --torch-python TORCH_VENV/bin/python \\
        --data-dir TFDS_DIR [--model airbench93] [--steps 20]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCH_SIDE = r'''
import json, sys
import numpy as np
import torch
from torch import nn

sys.path.insert(0, sys.argv[1])
torch.nn.Module.half = lambda self: self  # airbench's device lines, moved to the CPU in float32
torch.nn.Module.cuda = lambda self, *args, **kwargs: self
import airbench
from airbench import utils

spec = json.loads(sys.argv[2])
data = np.load(sys.argv[3])
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
make_net = {"airbench93": airbench.make_net93, "airbench94": airbench.make_net94}[spec["model"]]
net = make_net()
utils.init_whitening_conv(net[0], torch.tensor(data["whitening_images"]).permute(0, 3, 1, 2).contiguous())
batches = torch.tensor(data["images"]).permute(0, 1, 4, 2, 3).contiguous()
labels = torch.tensor(data["labels"]).long()
initial = {k: v.clone() for k, v in net.state_dict().items()}

def train(net):
    """airbench.utils.train's optimizer, schedule, loss and lookahead for spec["steps"] steps."""
    momentum, batch_size, total = spec["momentum"], batches.shape[1], spec["total_steps"]
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr = spec["learning_rate"] / kilostep_scale
    wd = spec["weight_decay"] * batch_size / kilostep_scale
    lr_biases = lr * spec["bias_scaler"]
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    other_params = [p for k, p in net.named_parameters() if "norm" not in k and p.requires_grad]
    optimizer = torch.optim.SGD(
        [dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
         dict(params=other_params, lr=lr, weight_decay=wd / lr)],
        momentum=momentum, nesterov=True)

    def get_lr(step):
        warmup_steps = int(total * 0.23)
        if step < warmup_steps:
            frac = step / warmup_steps
            return 0.2 * (1 - frac) + 1.0 * frac
        frac = (step - warmup_steps) / (total - warmup_steps)
        return 1.0 * (1 - frac) + 0.07 * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, get_lr)
    alpha_schedule = 0.95**5 * (torch.arange(total + 1) / total) ** 3
    lookahead_state = utils.LookaheadState(net)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec["label_smoothing"], reduction="none")
    net.train()
    losses = []
    for step in range(spec["steps"]):
        outputs = net(batches[step].to(memory_format=torch.channels_last))
        loss = loss_fn(outputs, labels[step]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item() / batch_size)
        if (step + 1) % 5 == 0:
            lookahead_state.update(net, decay=alpha_schedule[step + 1].item())
    return losses, {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}

losses, final = train(net)
perturbed = make_net()
generator = torch.Generator().manual_seed(1)
state = {}
for k, v in initial.items():
    if v.dtype == torch.float32 and v.ndim and "running" not in k:
        sign = torch.randint(0, 2, v.shape, generator=generator) * 2 - 1
        v = v * (1 + sign * 2.0**-23)
    state[k] = v
perturbed.load_state_dict(state)
perturbed_losses, perturbed_final = train(perturbed)
np.savez(sys.argv[4], losses=losses, perturbed_losses=perturbed_losses,
         **{"initial/" + k: v.numpy() for k, v in initial.items()},
         **{"final/" + k: v for k, v in final.items()},
         **{"perturbed/" + k: v for k, v in perturbed_final.items()})
'''


def torch_to_flax(tensors: dict, prefix: str, groups: int = 3) -> dict:
    """airbench's state_dict names and layouts (OIHW, (out, in)) -> our params and BatchNorm statistics."""
    get = lambda name: tensors[prefix + name]  # noqa: E731
    params = {"whiten": {"kernel": get("0.weight").transpose(2, 3, 1, 0), "bias": get("0.bias")}}
    stats = {}
    for i in range(1, groups + 1):
        module = f"{i + 1}."
        for j in (1, 2):
            params[f"group{i}_conv{j}"] = {"kernel": get(f"{module}conv{j}.weight").transpose(2, 3, 1, 0)}
            params[f"group{i}_norm{j}"] = {"bias": get(f"{module}norm{j}.bias")}
            norm = f"{module}norm{j}."
            stats[f"group{i}_norm{j}"] = {"mean": get(norm + "running_mean"), "var": get(norm + "running_var")}
    params["head"] = {"kernel": get(f"{groups + 4}.weight").T}
    return {"params": params, "batch_stats": stats}


def relative_gap(a: dict, b: dict) -> float:
    """|a - b| / |b| over every parameter, as one vector."""
    import jax

    left, right = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)]) for t in (a, b))
    return float(np.linalg.norm(left - right) / np.linalg.norm(right))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--airbench", required=True, help="a checkout of github.com/KellerJordan/cifar10-airbench")
    parser.add_argument("--torch-python", required=True, help="a Python with torch and torchvision")
    parser.add_argument("--data-dir", required=True, help="the tfds data_dir holding cifar10/3.0.2")
    parser.add_argument("--model", default="airbench93", choices=("airbench93", "airbench94"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    from resnet_jax import models, optimizer, train
    from resnet_jax.data import pipeline, registry

    config = __import__(f"configs.{args.model}", fromlist=["get_config"]).get_config()
    config.data.update(data_dir=args.data_dir, augment=False)
    dataset = registry.load_dataset(config.data)
    setup = train.Setup(config, dataset)
    mean, std = pipeline.normalization(config.data, dataset)
    normalise = jax.jit(lambda x: pipeline.preprocess(x, mean, std, jnp.float32))
    rows = (dataset.train_images, dataset.train_labels)
    batches = list(pipeline.train_batches(*rows, range(args.steps), batch_size=config.batch_size, seed=config.seed))
    images = np.stack([np.asarray(normalise(b["image"])) for b in batches])
    whitening_images = np.asarray(normalise(dataset.train_images[: train.WHITENING_IMAGES]))
    # airbench's form of the recipe's learning rate: per 1,024 examples on the summed loss.
    learning_rate = config.learning_rate * 1024 * (1 + 1 / (1 - config.momentum)) / config.base_batch_size
    spec = dict(model=args.model, steps=args.steps, total_steps=setup.num_steps, momentum=config.momentum)
    spec.update(learning_rate=learning_rate, weight_decay=config.weight_decay * learning_rate)
    spec["bias_scaler"] = optimizer.param_rules(config, setup.fresh_state.params)["group1_norm1"]["bias"][0]
    spec["label_smoothing"] = config.label_smoothing
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(data, images=images, labels=np.stack([b["label"] for b in batches]), whitening_images=whitening_images)
        subprocess.run([args.torch_python, "-c", TORCH_SIDE, args.airbench, json.dumps(spec), data, out], check=True)
        torch_run = dict(np.load(out))

    initial = torch_to_flax(torch_run, "initial/")
    ours_kernel, theirs_kernel = models.whitening_kernel(whitening_images), initial["params"]["whiten"]["kernel"]
    gap = lambda i, j: np.abs(ours_kernel[..., i] - theirs_kernel[..., j]).max()  # noqa: E731
    # An eigenvector's sign is arbitrary: channel i may come out as channel i + 12 (its negative).
    half = theirs_kernel.shape[-1] // 2
    matched = [min(gap(i, i), gap(i, (i + half) % (2 * half))) for i in range(2 * half)]
    layout, device = setup.layout, jax.local_devices()[:1]
    step_fn = layout.map_step(setup.configured_train_step(), device)
    state = layout.replicate(setup.with_weights(setup.fresh_state, initial), device)
    losses = []
    for b in batches:
        state = step_fn(state, layout.place_batch(b, device))
        losses.append(float(layout.unreplicate(state.train_metrics)["loss"]))
        state = state.replace(train_metrics=layout.replicate(train.empty_train_metrics(), device))
    ours = layout.unreplicate(state).params

    theirs_final = torch_to_flax(torch_run, "final/")["params"]
    perturbed_final = torch_to_flax(torch_run, "perturbed/")["params"]
    print(f"{args.model}: {args.steps} steps of batch {config.batch_size}, jax {jax.__version__}")
    print(f"whitening kernel, ours vs airbench's (channels matched up to sign): max |diff| {max(matched):.2e}")
    print("step  loss airbench  loss ours   |ours - airbench|  |perturbed - airbench|")
    table = zip(torch_run["losses"], losses, torch_run["perturbed_losses"])
    for step, (theirs, mine, perturbed) in enumerate(table, start=1):
        print(f"{step:4d}  {theirs:13.7f}  {mine:9.7f}  {abs(mine - theirs):17.2e}  {abs(perturbed - theirs):21.2e}")
    ours_gap, yardstick = relative_gap(ours, theirs_final), relative_gap(perturbed_final, theirs_final)
    loss_gap = max(abs(a - b) for a, b in zip(losses, torch_run["losses"]))
    loss_yardstick = max(abs(a - b) for a, b in zip(torch_run["perturbed_losses"], torch_run["losses"]))
    print(f"params after {args.steps} steps, |ours - airbench| / |airbench|:      {ours_gap:.2e}")
    print(f"params after {args.steps} steps, |perturbed - airbench| / |airbench|: {yardstick:.2e}")
    within = ours_gap <= 2 * yardstick and loss_gap <= 2 * max(loss_yardstick, 1e-6)
    print(f"largest loss gap {loss_gap:.2e} (yardstick {loss_yardstick:.2e}): {'PARITY' if within else 'NO PARITY'}")
    sys.exit(0 if within else 1)


if __name__ == "__main__":
    main()
