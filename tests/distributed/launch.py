"""One helper for multi-process tests: a free port, torchrun, a timeout, the output on failure, the logged metrics."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def run_command(cmd: list[str], timeout: int = 600, cwd: Path = REPO, env=None, check: bool = True):
    proc = subprocess.run(cmd, cwd=cwd, env=env or test_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(script: Path, nprocs: int, args: list[str], timeout: int = 600, check: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args]
    return run_command(cmd, timeout=timeout, check=check)


def train_rows(run_dir: Path) -> dict[int, dict]:
    """The last training row logged for each step in run_dir/metrics.jsonl (a resumed run appends to the file)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            rows[row["step"]] = row
    return rows
