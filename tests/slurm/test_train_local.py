"""launch/train_local.sh, the single-node sibling of the Slurm scripts: the deepspeed launcher on this machine."""

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_trained, overrides, process_env, run_command

pytestmark = pytest.mark.e2e


def test_train_local_passes_overrides_through(tmp_path):
    run_dir = tmp_path / "run"
    env = process_env()
    env.update(NUM_GPUS="2", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    # From another directory: the script finds the repository itself.
    run_command(["bash", str(REPO / "launch" / "train_local.sh"), *overrides(run_dir, "parallel.ep_size=2")],
                cwd=tmp_path, env=env)
    assert_trained(run_dir, steps=6)
