"""A lock file left by a killed JIT build of DeepSpeed's comm op stops the run with a message instead of a hang."""

import os
import threading
import time
from pathlib import Path

import pytest

from moe_recipe.deepspeed_compat import torch_extension_build_lock
from moe_recipe.engine import SHM_COMM_OP, check_op_build_lock


@pytest.fixture
def build_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = torch_extension_build_lock(SHM_COMM_OP).parent
    assert folder.is_relative_to(tmp_path)
    (folder / "build.ninja").write_text("")
    return folder


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_no_lock_passes(build_dir):
    check_op_build_lock()


def test_a_stale_lock_names_the_file_to_remove(build_dir):
    lock = build_dir / "lock"
    lock.touch()
    for path in build_dir.iterdir():
        age(path, 600)
    with pytest.raises(RuntimeError, match=f"Remove it \\(rm {lock}\\)"):
        check_op_build_lock(stale_after_s=300)


def test_a_live_build_is_waited_for(build_dir):
    """Files written recently: a build is running; the check returns once it releases the lock."""
    lock = build_dir / "lock"
    lock.touch()
    age(lock, 600)  # an old lock, but the build folder was written to just now
    threading.Timer(1.5, lock.unlink).start()
    start = time.perf_counter()
    check_op_build_lock(stale_after_s=300)
    assert 1.0 < time.perf_counter() - start < 10
