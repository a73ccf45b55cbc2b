"""Bad input stops every command the same way: exit status 2, one line on stderr that names the setting or the file
(its last line), no traceback, and nothing on disk changed.

Every case runs the real entry point as a user does (`python recipes/train.py ...`, `moe-export ...`), in one
process; one case runs two ranks under the deepspeed launcher to check that the message is printed once. The run
directory the command points at, an existing one with a config, metrics and checkpoints, is compared byte for byte
before and after (file paths and contents).
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_model import MoeConfig
from moe_recipe.checkpoint import check_resume, read_manifest
from tests.helpers import REPO, free_port, process_env, run_command

TRAIN = REPO / "recipes" / "train.py"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return [f"trainer.run_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'data-cache'}", "trainer.max_steps=2",
            "optim.warmup_steps=1", "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.eval_interval=2",
            "trainer.eval_batches=1", "trainer.checkpoint_interval=1", *extra]


def snapshot(path: Path) -> dict[str, str]:
    """Every file and folder under `path` (or the file itself) with a hash of its bytes."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(path.rglob("*"))}


def assert_refused(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2, no traceback, and the last line of stderr names each of `names`; returns that line."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in last, (name, last)
    return last


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory as training leaves it: config, metrics, checkpoints at steps 1 and 2, tokenizer."""
    run_dir = tmp_path_factory.mktemp("bad-input") / "run"
    run_command([sys.executable, str(TRAIN), *train_args(run_dir)])
    assert (run_dir / "checkpoints" / "step_00000002" / "checkpoint.json").is_file()
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def garble(path: Path) -> None:
    """Overwrite a file with random bytes of the same size (what the size check in the manifest cannot see)."""
    path.write_bytes(os.urandom(path.stat().st_size))


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, str(TRAIN), *train_args(run_dir, *extra)], check=False)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["parallel.ep_size=two"], ["parallel.ep_size='two' is not an integer"]),
        (["optim.lr=abc"], ["optim.lr='abc' is not a number"]),
        (["trainer.micro_batch_size=1.5"], ["trainer.micro_batch_size=1.5 is not an integer"]),
        (["+model.num_expert=8"], ["model.num_expert is not a setting", "did you mean model.num_experts?"]),
        (["trainer.max_step=3"], ["trainer.max_step is not a setting"]),
        (["model=tinyy"], ["model/tinyy"]),
        (["model.hidden_size=66"], ["model.hidden_size=66", "model.num_attention_heads=4", "model.head_dim"]),
        (["model.num_experts_per_tok=9"], ["num_experts_per_tok=9"]),
        (["parallel.ep_size=16"], ["ep_size=16"]),
        (["trainer.micro_batch_size=0"], ["trainer.micro_batch_size=0"]),
        (["optim.min_lr_ratio=2"], ["optim.min_lr_ratio=2.0"]),
        (["logging.wandb_mode=offlne"], ["logging.wandb_mode='offlne'"]),
        (["trainer.resume=/nonexistent/step_00000001"], ["trainer.resume='/nonexistent/step_00000001'"]),
    ],
    ids=["type-int", "type-float", "type-float-for-int", "plus-unknown-key", "unknown-key", "unknown-group-option",
         "heads-do-not-divide-hidden", "top-k-above-experts", "ep-size-above-experts", "zero-batch",
         "min-lr-ratio-out-of-range", "wandb-mode-typo", "resume-path-missing"],
)
def test_bad_settings(trained, overrides, names):
    before = snapshot(trained)
    assert_refused(train(trained, *overrides), "Invalid configuration", *names)
    assert snapshot(trained) == before


def test_precision_the_device_cannot_run(trained):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this device trains in fp16")
    before = snapshot(trained)
    assert_refused(train(trained, "trainer.precision=fp16"), "trainer.precision=fp16")
    assert snapshot(trained) == before


def test_tokenizer_that_does_not_parse(trained, tmp_path):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(REPO / "assets" / "tokenizer", tokenizer)
    text = (tokenizer / "tokenizer.json").read_text()
    (tokenizer / "tokenizer.json").write_text(text[: len(text) // 2])
    before = snapshot(trained)
    assert_refused(train(trained, f"data.tokenizer={tokenizer}"), f"{tokenizer}/tokenizer.json", "data.tokenizer")
    assert snapshot(trained) == before


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_run_dir_that_is_not_a_folder(tmp_path, where):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    run_dir = file if where == "is-a-file" else file / "run"
    assert_refused(train(run_dir), "trainer.run_dir", str(file), "a file, not a folder")
    assert file.read_text() == "mine"


def test_run_dir_the_user_cannot_write(run_copy):
    """A read-only run directory: a read-only bind mount for root (which ignores permission bits), else chmod."""
    before = snapshot(run_copy)
    cmd = [sys.executable, str(TRAIN), *train_args(run_copy)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare for a read-only mount")
        mount = f"mount --bind {run_copy} {run_copy} && mount -o remount,bind,ro {run_copy}"
        cmd = ["unshare", "--mount", "sh", "-c", f'{mount} && exec "$@"', "sh", *cmd]
        probe = subprocess.run(["unshare", "--mount", "sh", "-c", mount], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot make a read-only mount here: {probe.stderr.decode()[-200:]}")
    else:
        run_copy.chmod(0o555)
    try:
        assert_refused(run_command(cmd, check=False), "trainer.run_dir", "cannot write into")
    finally:
        run_copy.chmod(0o755)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "layer_1_expert_3_mp_rank_00_model_states.pt",
                                    "portable/model.layers.0.safetensors"])
def test_damaged_checkpoint_file_of_the_right_size(run_copy, victim):
    garble(run_copy / "checkpoints" / "step_00000002" / victim)
    before = snapshot(run_copy)
    last = assert_refused(train(run_copy, "trainer.max_steps=3"), "step_00000002", victim)
    assert "Delete it to resume from an older checkpoint" in last
    assert snapshot(run_copy) == before


def test_export_of_a_damaged_checkpoint(run_copy, tmp_path):
    garble(run_copy / "checkpoints" / "step_00000002" / "portable" / "lm_head.safetensors")
    before = snapshot(run_copy)
    proc = run_command([str(BIN / "moe-export"), str(run_copy), str(tmp_path / "export")], check=False)
    assert_refused(proc, "moe-export: error", "portable/lm_head.safetensors", "not a readable safetensors file")
    assert snapshot(run_copy) == before and not (tmp_path / "export").exists()


def test_export_onto_a_file(trained, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"not a folder")
    proc = run_command([str(BIN / "moe-export"), str(trained), str(target)], check=False)
    assert_refused(proc, "moe-export: error", str(target), "a file, not a folder")
    assert target.read_bytes() == b"not a folder"


def test_export_into_a_non_empty_folder(trained, tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("{}")
    before = snapshot(target)
    proc = run_command([str(BIN / "moe-export"), str(trained), str(target)], check=False)
    assert_refused(proc, "moe-export: error", str(target), "exists and is not empty")
    assert snapshot(target) == before


def test_routing_analysis_of_a_damaged_checkpoint(run_copy, tmp_path):
    garble(run_copy / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt")
    proc = run_command([str(BIN / "moe-analyze-routing"), str(run_copy), "--text", "def f(): pass",
                        "--out", str(tmp_path / "analysis")], check=False)
    assert_refused(proc, "moe-analyze-routing: error", "mp_rank_00_model_states.pt")
    assert not (tmp_path / "analysis").exists()


def test_tokenizer_command_onto_a_file(tmp_path):
    target = tmp_path / "tokenizer"
    target.write_text("mine")
    proc = run_command([str(BIN / "moe-train-tokenizer"), f"output={target}"], check=False)
    assert_refused(proc, "moe-train-tokenizer: error", "output=", "a file, not a folder")
    assert target.read_text() == "mine"


def test_planner_words_a_wrong_type_like_training():
    proc = run_command([sys.executable, "-m", "moe_recipe.plan", "parallel.ep_size=two"], check=False)
    assert_refused(proc, "Invalid configuration: parallel.ep_size='two' is not an integer")


def launch_two_ranks(*args: str, env: dict[str, str] | None = None, check: bool = False):
    """`deepspeed --num_gpus 2 recipes/train.py ARGS` on its own free port, as a user launches it."""
    launcher = shutil.which("deepspeed", path=str(BIN))
    return run_command([launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), *args],
                       env=env, check=check)


def assert_refused_once(proc: subprocess.CompletedProcess, *names: str) -> None:
    """assert_refused, and the message printed by one rank only: one line of the output starts with it."""
    last = assert_refused(proc, *names)
    prefix = last.split(":")[0]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(prefix)]
    assert lines == [last], lines


def test_two_ranks_print_the_message_once(trained):
    before = snapshot(trained)
    proc = launch_two_ranks(*train_args(trained, "parallel.ep_size=2", "optim.lr=abc"))
    assert_refused_once(proc, "Invalid configuration: optim.lr='abc' is not a number")
    assert snapshot(trained) == before


@pytest.mark.parametrize("hydra_full_error", [None, "0"])
def test_two_ranks_unknown_model_name(trained, hydra_full_error):
    """Hydra's own refusal (a config group option that does not exist), whatever HYDRA_FULL_ERROR the user set."""
    env = process_env()
    env.pop("HYDRA_FULL_ERROR", None)
    if hydra_full_error is not None:
        env["HYDRA_FULL_ERROR"] = hydra_full_error
    before = snapshot(trained)
    proc = launch_two_ranks(*train_args(trained, "parallel.ep_size=2", "model=nope"), env=env)
    assert_refused_once(proc, "Invalid configuration", "Could not find 'model/nope'", "tiny")
    assert snapshot(trained) == before


@pytest.fixture(scope="module")
def trained_autoep(tmp_path_factory) -> Path:
    """A run of the autoep backend (no layout-independent checkpoint state) at EP 2 on two ranks."""
    run_dir = tmp_path_factory.mktemp("bad-input-autoep") / "run"
    launch_two_ranks(*train_args(run_dir, "parallel.ep_size=2", *AUTOEP), check=True)
    assert (run_dir / "checkpoints" / "step_00000002" / "checkpoint.json").is_file()
    return run_dir


AUTOEP = ["model.moe_backend=autoep", "model.drop_tokens=false"]


@pytest.mark.parametrize("launch", ["two-ranks-ep1", "one-rank"])
def test_autoep_checkpoint_at_another_layout(trained_autoep, launch):
    """Refused before any process group: config.yaml and ds_config.json (and everything else) keep their bytes."""
    before = snapshot(trained_autoep)
    extra = ["trainer.max_steps=3", "parallel.ep_size=1", *AUTOEP]
    if launch == "one-rank":
        proc = train(trained_autoep, *extra)
    else:
        proc = launch_two_ranks(*train_args(trained_autoep, *extra))
    ranks = "2 ranks, " if launch == "one-rank" else ""
    assert_refused_once(proc, "Invalid configuration", "step_00000002", f"was saved at {ranks}parallel.ep_size=2",
                        "model.moe_backend='autoep'", "parallel.ep_size=1")
    assert snapshot(trained_autoep) == before


@pytest.mark.parametrize("lines, names", [(20, ["data.seq_len=128", "0 blocks"]),
                                          (1, ["data.data_files=", "corpus.txt", "holds 1 document(s)"])],
                         ids=["twenty-short-documents", "one-document"])
def test_two_ranks_corpus_smaller_than_a_block(tmp_path, lines, names):
    """A corpus of fewer tokens than data.seq_len: refused before any process group, no run directory made."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(lines)))  # documents of 3 tokens
    run_dir = tmp_path / "run"
    proc = launch_two_ranks(*train_args(run_dir, "parallel.ep_size=2", "data=local_files", "data.path=text",
                                        f"data.data_files=[{corpus}]"))
    assert_refused_once(proc, "Invalid configuration", *names)
    assert not run_dir.exists()


def test_resume_says_which_newer_save_it_passes_over(run_copy, caplog):
    """A newer save that did not finish is passed over with a warning that names it, never silently."""
    checkpoints = run_copy / "checkpoints"
    shutil.copytree(checkpoints / "step_00000002", checkpoints / "step_00000003.incomplete")
    config = MoeConfig.from_dict(read_manifest(checkpoints / "step_00000002")["model"])
    with caplog.at_level(logging.WARNING, logger="moe_recipe.checkpoint"):
        assert check_resume("auto", checkpoints, config).path == checkpoints / "step_00000002"
    assert "step_00000003.incomplete" in caplog.text and "did not finish" in caplog.text
