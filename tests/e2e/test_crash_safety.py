"""Real runs killed with SIGKILL at every phase of a checkpoint save; then bad resume requests.

One run directory goes through a chain of jobs, each killed at another point (tests/e2e/crash_train.py), one of them
at another layout (2 ranks, EP 2, between single-process EP 1 jobs). After each kill `latest` names a complete
checkpoint and every step_XXXXXXXX folder is complete; resume=auto continues from the newest complete one (not from
`latest`); the chain ends with the losses of one uninterrupted run. A missing, damaged or mismatched checkpoint then
stops the entry point with one message and leaves the run directory untouched.
"""

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from moe_model import MoeConfig
from moe_recipe.checkpoint import check_resume, read_manifest
from tests.helpers import REPO, free_port, overrides, process_env, run_command, train_rows

TRAIN = REPO / "recipes" / "train.py"
CRASHER = Path(__file__).with_name("crash_train.py")
pytestmark = pytest.mark.e2e

# ZeRO-1 partitions the optimizer state (over 2 ranks in the EP 2 job). RTS draws from each rank's RNG: off, so that
# EP 1 and EP 2 jobs compute the same thing. With 2 sequences per rank and micro step at both world sizes (grad_accum
# 2 on one rank), every micro batch holds the same sequences.
COMMON = ["model.use_rts=false", "zero=stage1", "trainer.checkpoint_interval=1", "trainer.eval_interval=100",
          "trainer.keep_last=null"]  # every checkpoint stays: the test names them
ONE_RANK = [*COMMON, "trainer.grad_accum=2"]
TWO_RANKS = [*COMMON, "parallel.ep_size=2", "trainer.grad_accum=1"]


def crash(run_dir: Path, at: str, procs: int = 1, rank: int | None = None) -> str:
    env = {**process_env(), "CRASH_AT": at}
    if rank is not None:
        env["CRASH_RANK"] = str(rank)
    if procs == 1:
        cmd = [sys.executable, str(CRASHER), *overrides(run_dir, *ONE_RANK)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(CRASHER), *overrides(run_dir, *TWO_RANKS)]
    proc = run_command(cmd, env=env, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"SIGKILL at {at.split('@')[0]}" in output, output[-3000:]
    return output


def assert_consistent(run_dir: Path, complete: list[int], incomplete: list[int], latest: int) -> None:
    """Exactly these checkpoints exist, each passes every check, and `latest` names a complete one."""
    checkpoints = run_dir / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_"))
    expected = [f"step_{s:08d}" for s in complete] + [f"step_{s:08d}.incomplete" for s in incomplete]
    assert names == sorted(expected)
    for step in complete:
        assert read_manifest(checkpoints / f"step_{step:08d}")["step"] == step
    pointed = (checkpoints / "latest").read_text()
    assert pointed == f"step_{latest:08d}" and latest in complete


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("crash")
    reference, run_dir = root / "reference", root / "run"
    run_command([sys.executable, str(TRAIN), *overrides(reference, *ONE_RANK)])

    crash(run_dir, "native@2#5")  # inside DeepSpeed's save of step 2
    assert_consistent(run_dir, complete=[1], incomplete=[2], latest=1)
    crash(run_dir, "portable@3#2")  # resumes from 1, saves 2, dies writing step 3's portable state
    assert_consistent(run_dir, complete=[1, 2], incomplete=[3], latest=2)
    crash(run_dir, "rename@3")  # everything written, manifest included, but not committed
    assert_consistent(run_dir, complete=[1, 2], incomplete=[3], latest=2)
    crash(run_dir, "latest@3")  # committed, `latest` not yet updated
    assert_consistent(run_dir, complete=[1, 2, 3], incomplete=[], latest=2)
    # Two ranks at EP 2: resume=auto must take step 3 (not `latest`) through the layout-independent state; rank 1
    # is killed writing step 5, rank 0 then fails in its next collective.
    crash(run_dir, "portable@5", procs=2, rank=1)
    assert_consistent(run_dir, complete=[1, 2, 3, 4], incomplete=[5], latest=4)
    # Back to one rank (EP 1) from the EP 2 checkpoint, to the end.
    run_command([sys.executable, str(TRAIN), *overrides(run_dir, *ONE_RANK)])
    assert_consistent(run_dir, complete=[1, 2, 3, 4, 5, 6], incomplete=[], latest=6)
    return reference, run_dir


def test_killed_jobs_resume_to_the_losses_of_one_uninterrupted_run(chain):
    reference, run_dir = chain
    expected, got = train_rows(reference), train_rows(run_dir)  # the last row of each step: the surviving timeline
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        # Steps 4-6 ran at EP 2 then EP 1 after layout changes: float32 round-off of another reduction order.
        tolerance = 1e-6 if step <= 3 else 1e-5
        for key in ("train/loss", "train/lm_loss", "train/aux_loss", "train/lr", "train/grad_norm"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=tolerance, abs=1e-7), (step, key)
    log = (run_dir / "train.log").read_text()
    assert "step_00000003 was saved at" in log and "step_00000004 was saved at" in log  # both layout changes


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def damaged(chain, tmp_path) -> tuple[Path, str]:
    """A copy of the last checkpoint with one expert file cut in half; the name of that file."""
    _, run_dir = chain
    copy = tmp_path / "damaged"
    shutil.copytree(run_dir / "checkpoints" / "step_00000006", copy)
    victim = next((copy / "portable").glob("model.layers.1.experts_*.safetensors"))
    os.truncate(victim, victim.stat().st_size // 2)
    return copy, f"portable/{victim.name}"


@pytest.mark.parametrize(
    "resume, model, message",
    [
        ("{nowhere}", {}, "no such folder"),
        ("{empty}", {}, "no complete checkpoint there"),
        ("auto", {"vocab_size": 8192}, "model.vocab_size=4096 there, 8192 here"),
        ("auto", {"hidden_size": 32}, "model.hidden_size=64 there, 32 here"),
        ("auto", {"num_experts": 4}, "model.num_experts=8 there, 4 here"),
        ("{damaged}", {}, "{victim} has"),
        ("none", {}, "a fresh start there would overwrite them"),
        ("{run}/checkpoints/step_00000003", {}, "holds newer checkpoints ['step_00000004'"),
    ],
    ids=["missing", "empty-folder", "other-vocab", "other-shape", "other-experts", "truncated", "fresh-start",
         "older-resume-point"],
)
def test_bad_resume_requests_are_refused_with_a_message(chain, damaged, tmp_path, resume, model, message):
    _, run_dir = chain
    (tmp_path / "empty").mkdir()
    config = MoeConfig.from_dict({**read_manifest(run_dir / "checkpoints" / "step_00000006")["model"], **model})
    resume = resume.format(nowhere=tmp_path / "nowhere", empty=tmp_path / "empty", damaged=damaged[0], run=run_dir)
    with pytest.raises(ValueError, match=re.escape(message.format(victim=damaged[1]))):
        check_resume(resume, run_dir / "checkpoints", config)


def test_a_step_folder_without_manifest_is_never_overwritten(chain, tmp_path):
    _, run_dir = chain
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", tmp_path / "step_00000002")
    (tmp_path / "step_00000002" / "checkpoint.json").unlink()  # e.g. an older version's checkpoint
    config = MoeConfig.from_dict(read_manifest(run_dir / "checkpoints" / "step_00000006")["model"])
    with pytest.raises(ValueError, match=re.escape("holds ['step_00000002'] without a checkpoint.json")):
        check_resume("auto", tmp_path, config)


@pytest.mark.parametrize("case", ["other-vocab", "truncated"])
def test_the_entry_point_stops_with_one_message_and_touches_nothing(chain, damaged, case):
    _, run_dir = chain
    args, message = {
        "other-vocab": (["model.vocab_size=8192"], "model.vocab_size=4096 there, 8192 here"),
        "truncated": ([f"trainer.resume={damaged[0]}"], f"{damaged[1]} has"),
    }[case]
    before = fingerprint(run_dir)
    proc = run_command([sys.executable, str(TRAIN), *overrides(run_dir, *ONE_RANK, *args)], check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and output.count(message) == 1 and "Traceback" not in output, output[-3000:]
    assert fingerprint(run_dir) == before
