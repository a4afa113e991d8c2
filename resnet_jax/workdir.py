"""The run's folder (README's "What a run writes"): its lock, its saved config and its metrics log."""

import json
import os
import socket
import tempfile
from typing import Optional

from resnet_jax.errors import Error

# Fields that make a resumed run meaningless when they change.
RESUME_FIELDS = (
    "model.name",
    "model.stem",
    "model.num_filters",
    "data.name",
    "data.validation_examples",
    "batch_size",
    "ema_decay",
    # These shape the optimizer state or the averages a checkpoint holds.
    "param_rules",
    "lookahead_every",
)


def prepare(workdir: str) -> None:
    """Creates `workdir` and checks that it can be written, before anything else runs."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise Error(f"cannot write to workdir {workdir}: {e.strerror or e}; choose another --workdir") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """An exclusive claim on a workdir: a second run refuses to start; a dead owner's lock is taken over."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "lock")
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._read()
                if holder and holder.get("host") == self.owner["host"] and not _pid_alive(holder.get("pid", -1)):
                    os.unlink(self.path)  # Stale: its process is gone.
                    continue
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another run"
                raise Error(
                    f"workdir {os.path.dirname(self.path)} is in use by {who}; wait for it, stop it, "
                    f"or use another --workdir (delete {self.path} if that run is surely gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._read() == self.owner:
            os.unlink(self.path)


def _get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config.get(key, {}) if isinstance(config, dict) else None
    return config


def _saved_config(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_config(workdir: str, config) -> None:
    """Refuses a config that changed what the checkpoints in `workdir` mean (to resume or evaluate them)."""
    if config.allow_config_change or (saved := _saved_config(workdir)) is None:
        return
    current = json.loads(config.to_json())
    # A field the saved config lacks is newer than the run, which had its default.
    changed = [k for k in RESUME_FIELDS if _get(saved, k) not in ({}, _get(current, k))]
    if changed:
        diffs = ", ".join(f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}" for k in changed)
        raise Error(
            f"workdir {workdir} holds a run with a different config ({diffs}); pass the run's own settings, "
            f"use another --workdir, or pass --config.allow_config_change=True to go on anyway"
        )


def check_and_save_config(workdir: str, config) -> None:
    """Refuses a run in `workdir` that cannot resume (its config.json predates `param_rules`: its optimizer
    state does not fit, or has a momentum of another loss) and `check_config`'s; saves the config there."""
    saved = _saved_config(workdir)
    if saved is not None and "param_rules" not in saved:
        why = "its optimizer state is laid out as before config.param_rules"
        if saved.get("hyperparameter_form") == "airbench":
            why = "its momentum is of airbench's summed loss, this optimizer's of the mean loss"
        raise Error(
            f"workdir {workdir} holds a run that cannot resume here: {why}; train in another --workdir (--mode eval,"
            f" predict and export still read its checkpoints; --config.init_from={workdir} starts from them)"
        )
    check_config(workdir, config)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))


class MetricsLog:
    """Appends records to metrics.jsonl (skipping any (step, split) already there, as after a
    resume from an earlier checkpoint) and mirrors them to TensorBoard."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.seen = {(r["step"], r["split"]) for r in read_metrics(self.path)}
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb+") as f:  # A killed writer may have left half a line.
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(workdir)

    def write(self, record: dict) -> None:
        key = (record["step"], record["split"])
        if key in self.seen:
            return
        self.seen.add(key)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name not in ("step", "split", "epoch"):
                self.writer.add_scalar(f"{record['split']}/{name}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl; a torn last line (a killed writer) is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
