"""The token store (memory-mapped reads, checks against the manifest and the tokenizer) and the sampler (which blocks
a rank reads at a step: world-size invariant, resumable, mixtures)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_recipe.data import (DataConfig, MixtureComponent, TrainingData, load_tokenizer, open_store,
                             open_training_data, permute, store_from_tokens, tokenizer_fingerprint)
from moe_recipe.data.sampler import MIXTURE_PERIOD, Component, epoch_seed, eval_row_ranges
from moe_recipe.data.store import file_lock

SEQ = 4


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DataConfig())


def token_store(folder: Path, tokenizer, num_tokens: int, seed: int, val_tokens: int = 64) -> Path:
    """A store from a nanoGPT-style raw uint16 file of random tokens (train) and a second one (val)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    generator.integers(2, len(tokenizer), num_tokens, dtype=np.uint16).tofile(folder / "train.bin")
    np.save(folder / "val.npy", generator.integers(2, len(tokenizer), val_tokens, dtype=np.uint16))
    store_from_tokens([folder / "train.bin"], [folder / "val.npy"], tokenizer, "assets/tokenizer",
                      tokenizer_fingerprint(DataConfig()), folder, val_fraction=0.05)
    return folder


def training_data(paths: dict[str, tuple[Path, float]], seed: int = 0) -> TrainingData:
    return TrainingData([Component(name, open_store(path, name), weight) for name, (path, weight) in paths.items()],
                        SEQ, seed)


def global_batch(data: TrainingData, step: int, world_size: int, micro_batch_size: int, grad_accum: int):
    """All rows of an optimizer step, micro step by micro step, ranks concatenated in rank order."""
    rows = []
    for micro_step in range(grad_accum):
        for rank in range(world_size):
            batch = data.train_micro_batch(step=step, micro_step=micro_step, rank=rank, world_size=world_size,
                                           micro_batch_size=micro_batch_size, grad_accum=grad_accum)
            assert batch.shape == (micro_batch_size, SEQ) and batch.dtype == torch.long
            rows.append(batch)
    return torch.cat(rows)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 17, 64, 1000, 4097])
def test_permute_is_a_seeded_bijection(n):
    index = np.arange(n)
    out = permute(index, n, seed=5)
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(permute(index[::-1], n, 5), out[::-1])  # elementwise: any chunk of indices
    if n > 3:
        assert not np.array_equal(permute(index, n, 6), out)


def test_reads_are_the_reference_blocks_of_the_permutation(tmp_path, tokenizer):
    # The reference: the flat tokens cut into blocks as the old in-memory packing did, read in the order of a
    # Feistel permutation per epoch computed here. Training feeds these rows to the model, so the losses follow.
    data = training_data({"main": (token_store(tmp_path, tokenizer, 10 * SEQ + 3, seed=1), 1.0)}, seed=7)
    blocks = torch.from_numpy(np.fromfile(tmp_path / "train.bin", dtype=np.uint16)[: 10 * SEQ].astype(np.int64))
    blocks = blocks.view(10, SEQ)
    rows = torch.cat([global_batch(data, step, world_size=2, micro_batch_size=2, grad_accum=1) for step in range(5)])
    expected = [blocks[permute(np.array([g % 10]), 10, epoch_seed(7, 0, g // 10))[0]] for g in range(20)]
    assert torch.equal(rows, torch.stack(expected))
    # Each epoch reads every block once, in its own order.
    first, second = [{tuple(r) for r in rows[e * 10 : (e + 1) * 10].tolist()} for e in (0, 1)]
    assert first == second == {tuple(b) for b in blocks.tolist()}
    assert not torch.equal(rows[:10], rows[10:])


def test_global_batch_does_not_depend_on_world_size(tmp_path, tokenizer):
    # One rank, DP 2 (EP 2 x DP 1 reads as 2 ranks), 4 ranks (EP 2 x DP 2): the same rows, step by step.
    data = training_data({"main": (token_store(tmp_path, tokenizer, 50 * SEQ, seed=2), 1.0)})
    for step in (0, 3, 11):  # 11 * 12 rows crosses the epoch boundary of 50 blocks
        for grad_accum in (1, 3):
            one_rank = global_batch(data, step, world_size=1, micro_batch_size=4, grad_accum=grad_accum)
            assert torch.equal(global_batch(data, step, world_size=2, micro_batch_size=2, grad_accum=grad_accum),
                               one_rank)
            assert torch.equal(global_batch(data, step, world_size=4, micro_batch_size=1, grad_accum=grad_accum),
                               one_rank)


def test_resume_mid_epoch_reads_the_batches_of_an_uninterrupted_run(tmp_path, tokenizer):
    path = token_store(tmp_path, tokenizer, 30 * SEQ, seed=3)
    kwargs = dict(micro_step=1, rank=1, world_size=2, micro_batch_size=3, grad_accum=2)
    uninterrupted = training_data({"main": (path, 1.0)}, seed=5)
    whole = [uninterrupted.train_micro_batch(step=step, **kwargs) for step in range(8)]
    resumed = training_data({"main": (path, 1.0)}, seed=5)  # a new process: nothing carried over but the step
    assert all(torch.equal(resumed.train_micro_batch(step=step, **kwargs), whole[step]) for step in (4, 5, 6, 7))
    assert not torch.equal(training_data({"main": (path, 1.0)}, seed=6).train_micro_batch(step=4, **kwargs), whole[4])


def test_out_of_range_positions_are_refused(tmp_path, tokenizer):
    data = training_data({"main": (token_store(tmp_path, tokenizer, 10 * SEQ, seed=1), 1.0)})
    kwargs = dict(step=0, world_size=2, micro_batch_size=1, grad_accum=2)
    with pytest.raises(ValueError, match="micro_step=2"):
        data.train_micro_batch(micro_step=2, rank=0, **kwargs)
    with pytest.raises(ValueError, match="rank=2"):
        data.train_micro_batch(micro_step=0, rank=2, **kwargs)


@pytest.mark.parametrize("num_rows, world_size, micro_batch_size, expected", [
    (10, 3, 2, [[(0, 2), (2, 4)], [(4, 6), (6, 8)], [(8, 10), (10, 10)]]),  # shares of 4: the last rank runs out
    (5, 4, 4, [[(0, 2)], [(2, 4)], [(4, 5)], [(5, 5)]]),  # shares of 2, one pass each, the last one empty
    (6, 1, 4, [[(0, 4), (4, 6)]]),
    (3, 2, 1, [[(0, 1), (1, 2)], [(2, 3), (3, 3)]]),
])
def test_eval_row_ranges(num_rows, world_size, micro_batch_size, expected):
    ranges = [eval_row_ranges(num_rows, rank=r, world_size=world_size, micro_batch_size=micro_batch_size)
              for r in range(world_size)]
    assert ranges == expected
    rows = [row for per_rank in ranges for start, stop in per_rank for row in range(start, stop)]
    assert rows == list(range(num_rows))  # every row once, in order, at any world size


def test_eval_reads_the_same_rows_at_any_world_size(tmp_path, tokenizer):
    data = training_data({"main": (token_store(tmp_path, tokenizer, 10 * SEQ, seed=1, val_tokens=10 * SEQ), 1.0)})
    val = torch.from_numpy(np.load(tmp_path / "val.npy").astype(np.int64)).view(10, SEQ)

    def eval_rows(world_size: int, max_batches: int) -> torch.Tensor:
        per_rank = [list(data.eval_micro_batches(0, rank=r, world_size=world_size, micro_batch_size=2,
                                                 max_batches=max_batches)) for r in range(world_size)]
        assert len({len(batches) for batches in per_rank}) == 1  # the same number of forward passes on each rank
        assert all(rows.shape == (2, SEQ) and not rows[real:].any() for b in per_rank for rows, real in b)
        return torch.cat([rows[:real] for batches in per_rank for rows, real in batches])

    for world_size in (1, 2, 3, 4):
        assert torch.equal(eval_rows(world_size, max_batches=4), val[:8])  # eval_batches x micro_batch_size rows
        assert torch.equal(eval_rows(world_size, max_batches=100), val)  # at most the split


def test_mixture_proportions_and_reproducibility(tmp_path, tokenizer):
    code = token_store(tmp_path / "code", tokenizer, 40 * SEQ, seed=4)
    web = token_store(tmp_path / "web", tokenizer, 200 * SEQ, seed=5)
    data = training_data({"code": (code, 0.2), "web": (web, 0.8)}, seed=1)
    code_blocks = {tuple(b) for b in np.fromfile(code / "train.bin", dtype=np.uint16).reshape(-1, SEQ).tolist()}
    counts = np.zeros(2, dtype=np.int64)
    seen_code = []
    for step in range(MIXTURE_PERIOD // 8):
        counts += data.step_counts(step, 8)
        rows = global_batch(data, step, world_size=2, micro_batch_size=2, grad_accum=2)
        from_code = [tuple(r) in code_blocks for r in rows.tolist()]
        assert sum(from_code) == data.step_counts(step, 8)[0]
        seen_code += [tuple(r) for r, c in zip(rows.tolist(), from_code) if c]
        assert abs(sum(from_code) - 0.2 * 8) < 1.01  # every step is within a sample of the weights
    assert counts.tolist() == [200, 800]
    # The code store is read epoch by epoch: its first 40 samples are its 40 blocks, once each.
    assert set(seen_code[:40]) == code_blocks and len(set(seen_code[:40])) == 40
    again = training_data({"code": (code, 0.2), "web": (web, 0.8)}, seed=1)
    assert torch.equal(again.train_micro_batch(step=7, micro_step=1, rank=0, world_size=2, micro_batch_size=2,
                                               grad_accum=2),
                       data.train_micro_batch(step=7, micro_step=1, rank=0, world_size=2, micro_batch_size=2,
                                              grad_accum=2))


def test_open_training_data_checks_each_store(tmp_path, tokenizer):
    code = token_store(tmp_path / "code", tokenizer, 40 * SEQ, seed=4)
    cfg = DataConfig(seq_len=SEQ, mixture=[{"name": "code", "store": str(code), "weight": 1.0},
                                           {"name": "web", "store": str(tmp_path / "absent"), "weight": 1.0}])
    with pytest.raises(ValueError, match=r"data.mixture\[1\].store: the token store .*absent does not exist.*"
                                         "moe-prepare-data"):
        open_training_data(cfg, tokenizer, global_batch_size=4)
    cfg = DataConfig(seq_len=SEQ, store=str(code))
    assert open_training_data(cfg, tokenizer, global_batch_size=40).num_train_blocks == [40]
    with pytest.raises(ValueError, match=r"data.store: the train split .* 40 blocks of data.seq_len=4, fewer than "
                                         "one global batch"):
        open_training_data(cfg, tokenizer, global_batch_size=41)
    # Eval takes whatever the val split holds, up to trainer.eval_batches x micro_batch_size blocks, but not nothing.
    no_val = token_store(tmp_path / "no-val", tokenizer, 40 * SEQ, seed=4, val_tokens=SEQ - 1)
    with pytest.raises(ValueError, match=r"the val split .* 0 blocks .* fewer than one block for evaluation = 1; .*"
                                         "raise data.val_fraction"):
        open_training_data(DataConfig(seq_len=SEQ, store=str(no_val)), tokenizer, global_batch_size=4)


def damage(store: Path, how: str) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    if how == "truncated":
        with (store / "train.bin").open("r+b") as f:
            f.truncate(f.seek(0, 2) - 2)
    elif how == "counts":
        manifest["splits"]["train"]["num_tokens"] += 1
    elif how == "tokenizer":
        manifest["tokenizer"].update(sha256="0" * 64, vocab_size=300, name="other")
    elif how == "manifest":
        (store / "manifest.json").write_text("{not json")
        return
    elif how == "no manifest":
        (store / "manifest.json").unlink()
        return
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how, message", [
    ("truncated", r"train.bin has 158 bytes but the manifest of .* says 160 \(truncated"),
    ("counts", "the train files of .* hold 80 tokens but the manifest says 81"),
    ("tokenizer", r"tokenized with 'other' \(300 tokens.*but data.tokenizer='assets/tokenizer' has 4096 tokens"),
    ("manifest", "manifest.json is not valid JSON"),
    ("no manifest", "has no manifest.json"),
])
def test_damaged_or_foreign_stores_are_refused_with_the_file_named(tmp_path, tokenizer, how, message):
    store = token_store(tmp_path / "store", tokenizer, 20 * SEQ, seed=1)
    damage(store, how)
    with pytest.raises(ValueError, match=f"^data.store: .*{message}"):
        open_training_data(DataConfig(seq_len=SEQ, store=str(store)), tokenizer, global_batch_size=1)


def test_from_tokens_holds_out_the_tail_and_checks_ids(tmp_path, tokenizer):
    tokens = np.arange(100, dtype=np.uint16) % 50
    tokens.tofile(tmp_path / "all.bin")
    store_from_tokens([tmp_path / "all.bin"], [], tokenizer, "t", "h", tmp_path / "store", val_fraction=0.1)
    store = open_store(tmp_path / "store", "x")
    assert store.train.tokens(0, 90).tolist() == tokens[:90].tolist()
    assert store.val.tokens(0, 10).tolist() == tokens[90:].tolist()
    assert store.train.num_documents == 2  # EOS (id 0) at positions 0 and 50
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        store_from_tokens([tmp_path / "all.bin"], [], tokenizer, "t", "h", tmp_path / "store", val_fraction=0.1)
    np.full(10, 5000, dtype=np.uint16).tofile(tmp_path / "big.bin")
    with pytest.raises(ValueError, match="id 5000, outside the tokenizer's 4096 ids"):
        store_from_tokens([tmp_path / "big.bin"], [], tokenizer, "t", "h", tmp_path / "big", val_fraction=0.1)
    shutil.rmtree(tmp_path / "store")


@pytest.mark.parametrize("mixture, message", [
    ([{"name": "a", "store": "x", "weight": 0.0}], r"data.mixture\[0\].weight=0.0 \(store 'x'\) must be > 0"),
    ([{"name": "a", "store": "x", "weight": -1}], r"data.mixture\[0\].weight=-1.0"),
    ([{"name": "a", "store": "x", "weight": 1}, {"name": "a", "store": "y", "weight": 1}], r"mixture\[1\].name='a'"),
    ([{"name": "a", "weight": 1}], r"data.mixture\[0\]=.* must have exactly the keys"),
])
def test_mixture_settings_are_checked(mixture, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(mixture=mixture).validate()
    assert MixtureComponent("a", "x", 1.0) == DataConfig(mixture=[{"name": "a", "store": "x", "weight": 1}]).mixture[0]


def test_file_lock_keeps_other_processes_out_until_released(tmp_path):
    """The build lock (filelock) is an flock on Unix: another process's non-blocking flock on the same file fails while
    it is held (so a process of a version with the hand-written flock waits too) and succeeds after."""
    lock = tmp_path / "stores" / ".store.lock"  # the folder does not exist yet
    try_flock = ("import fcntl, sys\nwith open(sys.argv[1], 'a') as f:\n    try:\n"
                 "        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                 "    except BlockingIOError:\n        sys.exit(3)")
    with file_lock(lock):
        assert subprocess.run([sys.executable, "-c", try_flock, str(lock)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", try_flock, str(lock)]).returncode == 0
