"""Loading DeepSpeed's CPU comm op: a build lock left by a killed run is cleared at once, a live build is waited for,
and a build says so before it starts."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from deepspeed.accelerator import get_accelerator

from moe_recipe import engine
from moe_recipe.deepspeed_compat import torch_extension_build_lock
from moe_recipe.engine import RECIPE_LOCK, SHM_COMM_OP, check_op_build_lock
from tests.helpers import REPO, process_env

pytestmark = pytest.mark.skipif(get_accelerator().device_name() != "cpu", reason="the comm op is loaded on CPU only")


@pytest.fixture
def build_dir(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_EXTENSIONS_DIR of the test's own (processes are killed in it)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = torch_extension_build_lock(SHM_COMM_OP).parent
    assert folder.is_relative_to(tmp_path)
    (folder / "build.ninja").write_text("")
    return folder


@pytest.fixture
def loads(monkeypatch) -> list[float]:
    """The op loads of this process (times), without building it: each test that needs a real build runs it in a
    child process."""
    times = []
    monkeypatch.setattr(engine, "load_shm_comm_op", lambda: times.append(time.monotonic()))
    return times


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_no_lock_loads_the_op_and_says_it_builds(build_dir, loads, capsys):
    check_op_build_lock()
    assert len(loads) == 1
    assert "building DeepSpeed's CPU comm op" in capsys.readouterr().err
    assert (build_dir / RECIPE_LOCK).read_text() == ""  # no holder left recorded
    (build_dir / f"{SHM_COMM_OP}.so").write_bytes(b"")
    check_op_build_lock()
    assert len(loads) == 2 and capsys.readouterr().err == ""  # built: nothing to say


def test_a_stale_lock_of_another_program_names_the_file_to_remove(build_dir, loads):
    lock = build_dir / "lock"
    lock.touch()
    for path in build_dir.iterdir():
        age(path, 600)
    with pytest.raises(RuntimeError, match=f"Remove it \\(rm {lock}\\)"):
        check_op_build_lock(stale_after_s=300)
    assert not loads


def test_a_live_build_of_another_program_is_waited_for(build_dir, loads):
    """Files written recently: a build is running; the check returns once it releases the lock."""
    lock = build_dir / "lock"
    lock.touch()
    age(lock, 600)  # an old lock, but the build folder was written to just now
    threading.Timer(1.5, lock.unlink).start()
    start = time.perf_counter()
    check_op_build_lock(stale_after_s=300)
    assert 1.0 < time.perf_counter() - start < 10 and len(loads) == 1


def start_real_build(build_dir: Path) -> subprocess.Popen:
    """A process (its own session, like a launched job) that loads the op for real and so builds it; returns once
    torch's lock exists."""
    env = {**process_env(), "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "from moe_recipe.engine import check_op_build_lock as c; c()"],
                            env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (build_dir / "lock").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "torch never took its build lock"
        time.sleep(0.2)
    return proc


def test_a_build_killed_with_sigkill_is_waited_for_while_alive_and_cleared_at_once_after(build_dir, loads, capfd):
    """Two loads at once (two ranks of a node): the second waits for the first and never touches its lock. The first
    is killed (SIGKILL to its whole session, as a job is torn down): the second goes on within seconds, removing the
    lock the killed build left."""
    builder = start_real_build(build_dir)
    try:
        waiter = threading.Thread(target=check_op_build_lock, daemon=True)
        waiter.start()
        waiter.join(timeout=4.0)
        assert waiter.is_alive() and not loads and (build_dir / "lock").exists()  # waits, lock untouched
        holder = (build_dir / RECIPE_LOCK).read_text().split()
        assert holder[1] == str(builder.pid)
    finally:
        os.killpg(builder.pid, signal.SIGKILL)
        builder.wait()
    killed = time.monotonic()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and len(loads) == 1
    assert loads[0] - killed < 5.0
    assert not (build_dir / "lock").exists()
    err = capfd.readouterr().err
    assert f"removed {build_dir / 'lock'}: process {builder.pid} on this host was killed" in err
