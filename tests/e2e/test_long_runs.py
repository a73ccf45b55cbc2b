"""A long run as an operator lives it, under the deepspeed launcher (2 ranks, EP 2): killed with SIGKILL, resumed,
stopped with Ctrl-C, resumed to the end. What a person reads about it must add up to one run: metrics.jsonl holds
every step once and in order, W&B one run id whose steps only go up, train.log one line per log step (no progress
bar: its output is not a terminal), Ctrl-C one line and no traceback; retention keeps the checkpoints it promises.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_recipe.checkpoint import list_checkpoints
from moe_recipe.deepspeed_compat import torch_extension_build_lock
from moe_recipe.engine import RECIPE_LOCK, SHM_COMM_OP
from moe_recipe.metrics import read_metrics
from tests.helpers import REPO, free_port, overrides, process_env, run_command
from tests.wandb_records import offline_segments

pytestmark = pytest.mark.e2e
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
STEPS = 24


def private_extensions_dir(tmp_path: Path) -> Path:
    """A TORCH_EXTENSIONS_DIR of this test's own, holding a copy of the built comm op (no rebuild): a job killed
    while torch holds its lock on the op must not leave that lock in everyone's folder."""
    built = torch_extension_build_lock(SHM_COMM_OP).parent
    root = tmp_path / "torch_extensions"
    if built.is_dir():  # with TORCH_EXTENSIONS_DIR set, torch builds in <it>/<op name>
        shutil.copytree(built, root / built.name, ignore=shutil.ignore_patterns("lock", RECIPE_LOCK))
    return root


def start(run_dir: Path, env: dict, log: Path, local_script: bool = False) -> subprocess.Popen:
    """The deepspeed launcher with 2 ranks, bare or through launch/train_local.sh."""
    args = overrides(run_dir, f"trainer.max_steps={STEPS}", "parallel.ep_size=2", "logging=offline",
                     "trainer.checkpoint_interval=4", "trainer.eval_interval=6", "trainer.heatmap_interval=5",
                     "trainer.keep_last=2", "trainer.keep_every=8")
    if local_script:
        cmd, env = ["bash", "launch/train_local.sh", *args], {**env, "NUM_GPUS": "2", "MASTER_PORT": str(free_port())}
    else:
        cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "recipes/train.py", *args]
    # A session of its own: the signals go to the launcher and every rank, as a terminal's Ctrl-C does.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [record["step"] for record in read_metrics(path)] if path.exists() else []


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not logged_steps(run_dir) or logged_steps(run_dir)[-1] < step:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def test_kill_ctrl_c_and_resume_leave_one_history(tmp_path):
    run_dir = tmp_path / "run"
    env = {**process_env(), "TORCH_EXTENSIONS_DIR": str(private_extensions_dir(tmp_path))}

    # Job 1: SIGKILL to every process after step 9 (checkpoint 8 is on disk; maybe 12 too).
    proc = start(run_dir, env, tmp_path / "job1.log")
    wait_for_step(proc, run_dir, 9, tmp_path / "job1.log")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = logged_steps(run_dir)[-1]
    resumed_from = int(list_checkpoints(run_dir / "checkpoints")[-1].name.removeprefix("step_"))
    assert resumed_from < killed_at

    # Job 2: resumes through launch/train_local.sh, and is stopped with Ctrl-C: exit 0, one line, no traceback.
    proc = start(run_dir, env, tmp_path / "job2.log", local_script=True)
    wait_for_step(proc, run_dir, killed_at + 3, tmp_path / "job2.log")
    signalled_at = logged_steps(run_dir)[-1]
    os.killpg(proc.pid, signal.SIGINT)
    output = (tmp_path / "job2.log").read_text
    assert proc.wait(timeout=120) == 0, output()[-4000:]
    output = output()
    assert "Traceback" not in output and "Error" not in output, output[-4000:]
    assert output.count("Ctrl-C: stopping after this step with a checkpoint") == 1, output[-4000:]
    stopped_at = logged_steps(run_dir)[-1]
    # StopCheck reads the ranks' flags one step late: the stop comes at most two steps after the last logged one.
    assert signalled_at <= stopped_at <= signalled_at + 2
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{stopped_at:08d}"
    assert f"stopped at step {stopped_at} (Ctrl-C)" in (run_dir / "train.log").read_text()

    # Job 3: resumes from the Ctrl-C checkpoint and finishes.
    proc = start(run_dir, env, tmp_path / "job3.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "job3.log").read_text()[-4000:]

    # One history: every step once, in order; eval in its step's record.
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all("train/loss" in r for r in records)
    assert [r["step"] for r in records if "eval/loss" in r] == [6, 12, 18, 24]

    # One W&B run, steps only going up across the three jobs' offline folders (what `wandb sync --id` uploads).
    segments = offline_segments(run_dir)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert len(segments) == 3 and {sid for sid, _ in segments} == {run_id}
    steps = [step for _, segment in segments for step in segment]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert set(range(killed_at + 1, STEPS + 1)) <= set(steps)

    # train.log: the header of each job, one line per log step, no progress bar.
    train_log = (run_dir / "train.log").read_text()
    assert train_log.count("batch: 4 sequences x 128 tokens = 512 tokens per step") == 3
    lines = [line for line in train_log.splitlines() if f"/{STEPS} | loss " in line]
    assert sorted({int(line.split("step ")[1].split("/")[0]) for line in lines}) == list(range(1, STEPS + 1))
    assert all("tokens/s" in line and "ETA" in line for line in lines)
    assert "\r" not in (tmp_path / "job3.log").read_text() and "it/s]" not in (tmp_path / "job3.log").read_text()

    # Heatmaps on their schedule (every 5 steps, and the last), whatever step a job resumed at.
    drawn = {int(p.stem.removeprefix("expert_load_step_")) for p in (run_dir / "routing").glob("*.json")}
    assert drawn <= {5, 10, 15, 20, 24} and {15, 20, 24} <= drawn

    # Retention: the newest 2 and the multiples of 8 (8, 16, 24).
    kept = [int(p.name.removeprefix("step_")) for p in list_checkpoints(run_dir / "checkpoints")]
    assert kept == sorted({*[8, 16], 20, 24})


def test_ten_saves_keep_the_newest_three_and_the_milestone(tmp_path):
    run_dir = tmp_path / "run"
    run_command([sys.executable, "recipes/train.py",
                 *overrides(run_dir, "trainer.max_steps=10", "trainer.checkpoint_interval=1", "trainer.keep_last=3",
                            "trainer.keep_every=5", "trainer.eval_interval=100", "trainer.heatmap_interval=null")])
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest", "step_00000005", "step_00000008", "step_00000009", "step_00000010"]
    assert (checkpoints / "latest").read_text() == "step_00000010"
    assert "removed step_00000007: trainer.keep_last=3" in (run_dir / "train.log").read_text()
