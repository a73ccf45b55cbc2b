"""The token store through the real entry points: moe-prepare-data (killed mid-write, bad files) and training from
stores (a mixture, bad stores), as a user runs them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_recipe.data import DataConfig, default_store_path, load_tokenizer, open_training_data
from moe_recipe.prepare_data import main as prepare_main
from tests.helpers import REPO, run_command, train_rows
from tests.helpers import process_env as launch_env

TRAIN = REPO / "recipes" / "train.py"
PREPARE = shutil.which("moe-prepare-data", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.e2e


def assert_one_message(proc, message: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert message in output and output.count(message) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_kill_during_preparation_leaves_no_store_and_a_rerun_completes(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    line = "The quick brown fox jumps over the lazy dog; " * 20
    corpus.write_text("".join(json.dumps({"text": f"{i} {line}"}) + "\n" for i in range(40_000)))
    store = tmp_path / "store"
    args = ["data=local_files", f"data.data_files=[{corpus}]", f"data.store={store}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**launch_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    proc = subprocess.Popen([PREPARE, "--num-proc", "1", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(tmp_path.glob(".store.tmp-*/train-*.bin")):  # tokens are being written
        assert proc.poll() is None and time.monotonic() < deadline, "preparation ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not store.exists() and any(tmp_path.glob(".store.tmp-*"))
    cfg = DataConfig(source="files", path="json", data_files=[str(corpus)], store=str(store))
    with pytest.raises(ValueError, match=f"data.store: the token store {store} does not exist"):
        open_training_data(cfg, load_tokenizer(cfg), global_batch_size=1)

    run_command([PREPARE, "--num-proc", "2", *args], env=env)  # no --overwrite needed: nothing was there
    assert not any(tmp_path.glob(".store.tmp-*"))  # the killed build's folder is cleaned up
    data = open_training_data(cfg, load_tokenizer(cfg), global_batch_size=8)
    assert data.components[0].store.train.num_documents + data.components[0].store.val.num_documents == 40_000
    # A store is never replaced without --overwrite.
    manifest = (store / "manifest.json").read_bytes()
    assert_one_message(run_command([PREPARE, *args], env=env, check=False), "already exists; pass --overwrite")
    assert (store / "manifest.json").read_bytes() == manifest


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "corrupt.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 40)
    return folder


BAD_FILE_CASES = [
    ("missing.jsonl", "json", "data.data_files: {f} does not exist"),
    ("empty.jsonl", "json", "data.data_files: {f} is empty"),
    ("corrupt.jsonl", "json", "data.data_files=['{f}'] could not be read as data.path=json"),
    ("binary.txt", "text", "data.data_files: {f} is not UTF-8 text"),
]


@pytest.mark.parametrize("name, builder, message", BAD_FILE_CASES)
def test_bad_data_files_stop_preparation_with_one_message(bad_files, tmp_path, name, builder, message):
    f = bad_files / name
    proc = run_command([PREPARE, "data=local_files", f"data.path={builder}", f"data.data_files=[{f}]",
                        f"data.cache_dir={tmp_path}"], check=False)
    assert_one_message(proc, message.format(f=f))


def test_bad_data_file_stops_the_quick_start_before_training(bad_files, tmp_path):
    f = bad_files / "corrupt.jsonl"
    proc = run_command([sys.executable, str(TRAIN), "data=local_files", f"data.data_files=[{f}]",
                        f"data.cache_dir={tmp_path / 'cache'}", f"trainer.run_dir={tmp_path / 'run'}"], check=False)
    assert_one_message(proc, f"Invalid configuration: data.data_files=['{f}'] could not be read as data.path=json")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory) -> tuple[Path, Path]:
    """Two stores of the embedded corpus with different document splits, prepared by the command (in-process)."""
    root = tmp_path_factory.mktemp("stores")
    for name, seed in (("code", 1), ("web", 2)):
        prepare_main(["--num-proc", "1", f"data.seed={seed}", f"data.store={root / name}",
                      f"data.cache_dir={root / 'cache'}"])
    return root / "code", root / "web"


def test_mixture_trains_and_logs_the_realised_proportions(two_stores, tmp_path):
    code, web = two_stores
    run_dir = tmp_path / "run"
    mixture = f"data.mixture=[{{name:code,store:{code},weight:0.25}},{{name:web,store:{web},weight:0.75}}]"
    run_command([sys.executable, str(TRAIN), mixture, f"trainer.run_dir={run_dir}", "trainer.max_steps=4",
                 "optim.warmup_steps=1", "trainer.micro_batch_size=4", "trainer.log_interval=2",
                 "trainer.eval_interval=4", "trainer.eval_batches=1"])
    rows = train_rows(run_dir)
    assert sorted(rows) == [2, 4]
    for row in rows.values():  # 2 steps x 4 samples per log window: 2 code, 6 web
        assert (row["data/code_fraction"], row["data/web_fraction"]) == (0.25, 0.75)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in line]
    assert {"eval/code/loss", "eval/web/loss"} <= set(evals[-1])


@pytest.mark.parametrize("args, message", [
    (["data.store={missing}"], "Invalid configuration: data.store: the token store {missing} does not exist"),
    (["data.mixture=[{{name:code,store:{code},weight:0}}]"], "Invalid configuration: data.mixture[0].weight=0.0"),
    (["data.store={code}", "data.tokenizer={tokenizer}", "model.vocab_size=300"],
     "Invalid configuration: data.store: the token store {code} was tokenized with 'assets/tokenizer'"),
    (["data.store={code}", "trainer.micro_batch_size=1000"],
     "Invalid configuration: data.store: the train split of the token store {code} has"),
])
def test_bad_stores_stop_training_with_one_message(two_stores, tmp_path, args, message):
    code, _ = two_stores
    tokenizer = tmp_path / "tokenizer"
    if "tokenizer" in message or any("tokenizer" in a for a in args):
        from moe_recipe.tokenizer import train_tokenizer

        train_tokenizer(iter(["some text to learn merges from"] * 10), 300).save_pretrained(str(tokenizer))
    fill = dict(missing=tmp_path / "missing", code=code, tokenizer=tokenizer)
    proc = run_command([sys.executable, str(TRAIN), *[a.format(**fill) for a in args],
                        f"trainer.run_dir={tmp_path / 'run'}"], check=False)
    assert_one_message(proc, message.format(**fill))
    assert not (tmp_path / "run").exists()
