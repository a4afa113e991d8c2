"""torchvision-style PyTorch ResNet state_dicts as this package's Flax variables (`init_from`, the
parity test). Values may be torch tensors or numpy arrays; torch is never imported."""

import numpy as np

BLOCK_LAYERS = {
    "basic": ("conv1", "bn1", "conv2", "bn2"),
    "bottleneck": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
}
# torch BatchNorm field -> (Flax collection, Flax name).
BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


class Mismatch(ValueError):
    """A state_dict whose keys do not fit the ResNet: `missing` keys in model order, `unmapped` keys sorted."""

    def __init__(self, message, missing, unmapped):
        super().__init__(message)
        self.missing, self.unmapped = missing, unmapped


def to_numpy(value):
    """A torch tensor or array-like as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def key_map(stage_sizes, block, has_projection):
    """(torch key, Flax collection, Flax path, transform) for every tensor of the ResNet."""
    entries = []

    def conv(torch_name, path):
        entries.append((f"{torch_name}.weight", "params", path + ("kernel",), lambda w: w.transpose(2, 3, 1, 0)))

    def norm(torch_name, path):
        for field, (collection, name) in BN_FIELDS.items():
            entries.append((f"{torch_name}.{field}", collection, path + (name,), lambda x: x))

    conv("conv1", ("conv_init",))
    norm("bn1", ("bn_init",))
    for i, num_blocks in enumerate(stage_sizes, start=1):
        for j in range(num_blocks):
            prefix, path = f"layer{i}.{j}", f"stage{i}_block{j + 1}"
            for name in BLOCK_LAYERS[block]:
                (conv if name.startswith("conv") else norm)(f"{prefix}.{name}", (path, name))
            if has_projection(prefix):
                conv(f"{prefix}.downsample.0", (path, "proj_conv"))
                norm(f"{prefix}.downsample.1", (path, "proj_bn"))
    entries.append(("fc.weight", "params", ("head", "kernel"), lambda w: w.T))
    entries.append(("fc.bias", "params", ("head", "bias"), lambda b: b))
    return entries


def torch_to_flax(state_dict, stage_sizes, block="basic"):
    """Maps a torchvision-style ResNet state_dict to Flax ``{"params": ..., "batch_stats": ...}``."""
    if block not in BLOCK_LAYERS:
        raise ValueError(f"block must be one of {sorted(BLOCK_LAYERS)}, got {block!r}")
    arrays = {k: to_numpy(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    entries = key_map(stage_sizes, block, lambda prefix: f"{prefix}.downsample.0.weight" in arrays)
    missing = [key for key, *_ in entries if key not in arrays]
    unmapped = sorted(set(arrays) - {key for key, *_ in entries})
    if missing or unmapped:
        raise Mismatch(
            f"state_dict does not fit a {block} ResNet with stage_sizes={tuple(stage_sizes)}: "
            f"missing keys {missing}, unmapped keys {unmapped}",
            missing,
            unmapped,
        )
    variables = {"params": {}, "batch_stats": {}}
    for key, collection, path, transform in entries:
        scope = variables[collection]
        for part in path[:-1]:
            scope = scope.setdefault(part, {})
        scope[path[-1]] = np.ascontiguousarray(transform(arrays[key]))
    return variables
