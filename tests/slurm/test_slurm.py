"""The project's launch scripts on a real Slurm (see cluster.py): one node and two, the deepspeed launcher and srun,
preemption and requeue, and a Hydra sweep through the submitit launcher.

Every job trains the tiny model with expert parallelism over 2 ranks on the same data, so the runs must agree loss
for loss with the first one, however they were launched, spread over nodes or interrupted.
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO, assert_trained, overrides, process_env, train_rows
from tests.wandb_records import history_and_config

from .cluster import SlurmCluster, start_cluster

pytestmark = pytest.mark.slurm

STEPS = 20  # enough for the preemption signal to land mid-run (a step takes ~0.1s here)
COMPARED = ("train/loss", "train/lm_loss", "train/aux_loss", "train/lr", "train/grad_norm")


@pytest.fixture(scope="module")
def slurm():
    cluster = start_cluster(num_nodes=2, gpus=2)  # in CI a Slurm that cannot be set up fails, elsewhere it skips
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")  # one data cache (workdir/data-cache) for every run


def run_overrides(run_dir: Path, *extra: str) -> list[str]:
    return overrides(run_dir, f"trainer.max_steps={STEPS}", "trainer.eval_interval=10",
                     "trainer.checkpoint_interval=10", "parallel.ep_size=2", "zero=stage1", *extra)


def submit(slurm: SlurmCluster, script: str, run_dir: Path, *, nodes: int, gpus_per_node: int,
           extra: tuple[str, ...] = ()) -> int:
    """sbatch the script as a user would, from the repository root; the job's log goes next to its run directory."""
    options = [f"--nodes={nodes}", f"--gpus-per-node={gpus_per_node}", "--time=15", f"--job-name={run_dir.name}",
               f"--output={run_dir.parent}/%x-%j.out", f"--chdir={REPO}"]
    if script == "slurm_srun.sbatch":
        options += [f"--ntasks-per-node={gpus_per_node}", "--cpus-per-task=1"]
    return slurm.sbatch(*options, f"launch/{script}", *run_overrides(run_dir, *extra),
                        env=slurm.env(process_env()))


def job_log(run_dir: Path, job_id: int) -> str:
    return (run_dir.parent / f"{run_dir.name}-{job_id}.out").read_text(errors="replace")


def assert_finished(slurm: SlurmCluster, job_id: int, run_dir: Path, restarts: int = 0) -> dict[str, str]:
    job = slurm.wait(job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", str(restarts)), (
        f"{job}\n--- job log\n{job_log(run_dir, job_id)[-6000:]}")
    return job


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    expected, got = train_rows(reference), train_rows(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        for key in COMPARED:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)


@pytest.fixture(scope="module")
def reference(slurm, workdir) -> tuple[Path, int]:
    """One node x 2 GPUs through the deepspeed launcher: the run every other job is compared with."""
    run_dir = workdir / "one-node"
    job_id = submit(slurm, "slurm_deepspeed.sbatch", run_dir, nodes=1, gpus_per_node=2, extra=("logging=offline",))
    assert_finished(slurm, job_id, run_dir)
    return run_dir, job_id


def test_deepspeed_sbatch_one_node_ep2(slurm, reference):
    run_dir, job_id = reference
    rows = assert_trained(run_dir, steps=STEPS)
    assert (run_dir / "hostfile").read_text() == "n1 slots=2\n"
    log = job_log(run_dir, job_id)
    assert f"job {job_id} (restart 0) on n1: run dir {run_dir}, master n1:" in log
    assert "nnodes=1, num_local_procs=2, node_rank=0" in log

    history, config = history_and_config(run_dir)
    assert config["parallel"] == {"ep_size": 2} and config["trainer"]["run_dir"] == str(run_dir)
    logged = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert logged == pytest.approx({step: row["train/loss"] for step, row in rows.items()})


@pytest.mark.parametrize("script", ["slurm_deepspeed.sbatch", "slurm_srun.sbatch"])
def test_two_nodes_match_one_node(slurm, workdir, reference, script):
    """Two hosts (network namespaces n1, n2), one rank each: the ranks meet at n1 over the bridge."""
    run_dir = workdir / f"two-nodes-{script.split('.')[0]}"
    job_id = submit(slurm, script, run_dir, nodes=2, gpus_per_node=1)
    job = assert_finished(slurm, job_id, run_dir)
    assert (job["NodeList"], job["BatchHost"], job["NumNodes"]) == ("n[1-2]", "n1", "2")
    log = job_log(run_dir, job_id)
    assert f"on n[1-2]: run dir {run_dir}, master n1:" in log
    assert log.count("Token store ") == 1  # moe-prepare-data --if-missing ran once, in the batch script
    if script == "slurm_deepspeed.sbatch":  # one launcher per node, each knowing its line of the hostfile
        assert (run_dir / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
        for node_rank in (0, 1):
            assert any(line.startswith(f"{node_rank}: ") and f"nnodes=2, num_local_procs=1, node_rank={node_rank}"
                       in line for line in log.splitlines()), log[-6000:]  # srun --label: "<node index>: "
    assert_trained(run_dir, steps=STEPS)
    assert_same_losses(run_dir, reference[0])


def test_preemption_checkpoints_requeues_and_resumes(slurm, workdir, reference):
    """USR1 (what --signal=USR1@... sends before the time limit) mid-run: checkpoint, requeue, resume, same losses."""
    run_dir = workdir / "preempted"
    job_id = submit(slurm, "slurm_deepspeed.sbatch", run_dir, nodes=2, gpus_per_node=1)
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").is_file() or not train_rows(run_dir):  # training has started
        assert slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), job_log(run_dir, job_id)[-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", str(job_id))

    assert_finished(slurm, job_id, run_dir, restarts=1)
    log = job_log(run_dir, job_id)
    preempted_at = int(re.search(r"stopped at step (\d+) \(preemption signal\)", log)[1])
    assert preempted_at < STEPS
    assert (run_dir / "checkpoints" / f"step_{preempted_at:08d}").is_dir()
    for expected in (f"job {job_id}: preempted, checkpoint saved in {run_dir}/checkpoints; requeueing",
                     f"job {job_id} (restart 1) on n[1-2]"):
        assert expected in log, (expected, log[-6000:])
    assert re.search(rf"resumed from .*step_{preempted_at:08d}.* at step {preempted_at}\b", log), log[-6000:]
    assert_trained(run_dir, steps=STEPS)
    assert_same_losses(run_dir, reference[0])


def test_hydra_sweep_through_submitit(slurm, workdir, reference):
    """`--multirun hydra/launcher=slurm`: one array job per learning rate, 2 tasks each (ranks from srun_rank.sh)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="needs hydra-submitit-launcher (pip install hydra-submitit-launcher)")
    sweep_dir = workdir / "sweep"
    cmd = [sys.executable, "recipes/train.py", "--multirun", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=15",
           *[arg for arg in run_overrides(workdir / "sweep") if not arg.startswith("trainer.run_dir=")],
           "trainer.run_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}", "optim.lr=3e-3,1e-3"]
    proc = subprocess.run(cmd, cwd=REPO, env=slurm.env(process_env()), capture_output=True, text=True, timeout=900)
    logs = "".join(path.read_text(errors="replace")[-3000:] for path in sweep_dir.glob(".submitit/*/*.out"))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n--- job logs\n{logs}"
    for job_num, lr in enumerate([3e-3, 1e-3]):
        run_dir = sweep_dir / str(job_num)
        assert_trained(run_dir, steps=STEPS)
        assert OmegaConf.load(run_dir / "config.yaml").optim.lr == lr
    assert_same_losses(sweep_dir / "0", reference[0])  # the default lr: the same run as the reference
