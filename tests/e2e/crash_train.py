"""recipes/train.py, killed with SIGKILL at a chosen point of a checkpoint save (for test_crash_safety.py).

    CRASH_AT=<point>@<step>[#<n>]  python tests/e2e/crash_train.py <hydra overrides>   (or under torchrun)

kills the process the n-th time (default: the first) it reaches <point> while saving the checkpoint of <step>;
CRASH_RANK=<r> limits that to one rank (the others then fail in their next collective). Points, in save order:
    native    DeepSpeed is about to write one of its checkpoint files
    portable  one layout-independent safetensors file is about to be written
    rename    rank 0 is about to rename step_XXXXXXXX.incomplete to step_XXXXXXXX (the commit)
    latest    rank 0 is about to point `latest` at the new checkpoint
"""

import os
import signal
import sys
from pathlib import Path

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

import moe_recipe.callbacks as callbacks
import moe_recipe.checkpoint as checkpoint
import moe_recipe.reshard as reshard
from recipes import train

point, _, target = os.environ["CRASH_AT"].partition("@")
target_step, _, target_hit = target.partition("#")
active = os.environ.get("CRASH_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
saving = {"step": None, "hits": 0}


def reached(name: str) -> None:
    if active and name == point and saving["step"] == int(target_step):
        saving["hits"] += 1
        if saving["hits"] == int(target_hit or 1):
            print(f"crash_train: SIGKILL at {name} of step {target_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def hook(owner, attr: str, name: str, when=lambda *args, **kwargs: True) -> None:
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            reached(name)
        return original(*args, **kwargs)

    setattr(owner, attr, wrapper)


def save_checkpoint(engine, checkpoint_dir: Path, step: int) -> Path:
    saving["step"] = step
    return original_save(engine, checkpoint_dir, step)


original_save = callbacks.save_checkpoint
callbacks.save_checkpoint = save_checkpoint  # what the Checkpointer calls
hook(TorchCheckpointEngine, "save", "native")
hook(reshard, "save_file", "portable")
hook(checkpoint.os, "rename", "rename")
hook(checkpoint, "write_atomic", "latest", when=lambda path, text: Path(path).name == "latest")

if __name__ == "__main__":
    sys.argv[0] = str(Path(train.__file__))
    train.main()
