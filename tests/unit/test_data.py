import json
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics
from transformers import AutoTokenizer

from moe_recipe import tokenizer as tokenizer_command
from moe_recipe.data import (
    DataConfig,
    eval_micro_batches,
    load_documents,
    load_tokenizer,
    prepare_splits,
    split_documents,
    train_micro_batch,
    write_pydoc_corpus,
)

# Each document carries a unique marker word so that decoded blocks tell which documents they came from.
DOCUMENTS = [f"Document doc{i:02d} says: the quick brown fox jumps over {i} lazy dogs." for i in range(20)]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(DOCUMENTS)))
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    output = tmp_path_factory.mktemp("tokenizer")
    cache_dir = tmp_path_factory.mktemp("tokenizer_cache")
    tokenizer_command.main([
        "--vocab-size", "300", "--output", str(output), "--cache-dir", str(cache_dir),
        "--source", "files", "--path", "json", "--data-files", str(corpus_file),
    ])  # fmt: skip
    return output


def files_config(corpus_file: Path, tokenizer_dir: Path, cache_dir: Path, **overrides) -> DataConfig:
    return DataConfig(
        source="files", path="json", data_files=[str(corpus_file)], tokenizer=str(tokenizer_dir),
        cache_dir=str(cache_dir), **overrides,
    )  # fmt: skip


def markers(blocks: torch.Tensor, tokenizer) -> set[str]:
    text = tokenizer.decode(blocks.flatten())
    return {f"doc{i:02d}" for i in range(len(DOCUMENTS)) if f"doc{i:02d}" in text}


def test_pydoc_corpus_loads_through_load_dataset(tmp_path):
    documents = load_documents(DataConfig(cache_dir=str(tmp_path)))
    assert len(documents) == len(topics)
    assert documents[0]["text"] == topics[sorted(topics)[0]]
    assert all(Path(f["filename"]).is_relative_to(tmp_path) for f in documents.cache_files)


def test_pydoc_corpus_file_is_not_rewritten_when_unchanged(tmp_path):
    # datasets fingerprints local files by modification time: a rewrite would invalidate every cache downstream.
    path = write_pydoc_corpus(tmp_path)
    mtime = path.stat().st_mtime_ns
    assert write_pydoc_corpus(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime


def test_tokenizer_command_trains_a_loadable_round_tripping_tokenizer(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert len(tokenizer) == 300
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|pad|>"
    )  # fmt: skip
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    text = "The quick brown fox, naïve café — 日本語 ✓\n\tindented"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_default_tokenizer_is_committed_and_loads():
    tokenizer = load_tokenizer(DataConfig())
    assert len(tokenizer) == 4096
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)


def test_packing_concatenates_train_documents_in_order_with_eos(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=7, val_fraction=0.2, seed=3)
    tokenizer = load_tokenizer(cfg)
    splits = prepare_splits(cfg, tokenizer)

    train_indices, val_indices = split_documents(len(DOCUMENTS), cfg.val_fraction, cfg.seed)
    for blocks, indices in ((splits.train, train_indices), (splits.val, val_indices)):
        expected = []
        for i in indices:
            expected += tokenizer(DOCUMENTS[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        num_blocks = len(expected) // cfg.seq_len
        assert blocks.dtype == torch.long
        assert blocks.shape == (num_blocks, cfg.seq_len)
        assert blocks.flatten().tolist() == expected[: num_blocks * cfg.seq_len]
    assert (splits.num_train_documents, splits.num_val_documents) == (16, 4)


def test_tokenization_cache_is_reused(tmp_path, corpus_file, tiny_tokenizer_dir, monkeypatch):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=8)
    first = prepare_splits(cfg, load_tokenizer(cfg))
    cache_files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.arrow")}

    # A fresh tokenizer object (as in a new process) that fails if it is asked to tokenize anything.
    tokenizer = load_tokenizer(cfg)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    second = prepare_splits(cfg, tokenizer)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.arrow")} == cache_files


def test_another_tokenizer_gets_its_own_cache(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=8)
    prepare_splits(cfg, load_tokenizer(cfg))
    default_cfg = files_config(corpus_file, DataConfig().tokenizer, tmp_path, seq_len=8)
    fresh_cfg = files_config(corpus_file, DataConfig().tokenizer, tmp_path / "fresh", seq_len=8)
    default_tokenizer = load_tokenizer(default_cfg)
    reused_cache = prepare_splits(default_cfg, default_tokenizer)
    assert torch.equal(reused_cache.train, prepare_splits(fresh_cfg, default_tokenizer).train)


def test_train_and_val_are_disjoint_by_document(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=4, val_fraction=0.25)
    tokenizer = load_tokenizer(cfg)
    splits = prepare_splits(cfg, tokenizer)
    train_markers, val_markers = markers(splits.train, tokenizer), markers(splits.val, tokenizer)
    assert len(val_markers) == 5
    assert train_markers.isdisjoint(val_markers)
    assert len(train_markers | val_markers) == len(DOCUMENTS)


def test_split_documents_is_seeded_and_keeps_one_document_each():
    train, val = split_documents(100, 0.05, seed=0)
    assert len(val) == 5 and sorted(train + val) == list(range(100))
    assert train == sorted(train) and val == sorted(val)
    assert split_documents(100, 0.05, seed=0) == (train, val)
    assert split_documents(100, 0.05, seed=1) != (train, val)
    assert tuple(map(len, split_documents(2, 0.001, seed=0))) == (1, 1)
    assert tuple(map(len, split_documents(2, 0.999, seed=0))) == (1, 1)
    with pytest.raises(ValueError, match="at least one each"):
        split_documents(1, 0.5, seed=0)


def test_too_little_val_data_raises(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=512)
    with pytest.raises(ValueError, match="lower data.seq_len, raise data.val_fraction"):
        prepare_splits(cfg, load_tokenizer(cfg))


def test_text_files_give_one_document_per_line(tmp_path, tiny_tokenizer_dir):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(DOCUMENTS) + "\n")
    cfg = DataConfig(source="files", path="text", data_files=[str(text_file)], cache_dir=str(tmp_path / "cache"),
                     tokenizer=str(tiny_tokenizer_dir), seq_len=4)
    assert load_documents(cfg)["text"][:] == DOCUMENTS
    splits = prepare_splits(cfg, load_tokenizer(cfg))
    assert splits.num_train_documents + splits.num_val_documents == len(DOCUMENTS)


def test_text_field_and_max_documents(tmp_path, corpus_file):
    cfg = DataConfig(source="files", path="json", data_files=[str(corpus_file)], cache_dir=str(tmp_path),
                     max_documents=5)
    documents = load_documents(cfg)
    assert documents.column_names == ["text"] and documents["text"][:] == DOCUMENTS[:5]
    with pytest.raises(ValueError, match=r"data.text_field='body'.*\['text', 'id'\]"):
        load_documents(DataConfig(source="files", path="json", data_files=[str(corpus_file)], cache_dir=str(tmp_path),
                                  text_field="body"))


def test_streaming_takes_the_first_documents(tmp_path, corpus_file):
    cfg = DataConfig(source="files", path="json", data_files=[str(corpus_file)], cache_dir=str(tmp_path),
                     streaming=True, max_documents=6)
    documents = load_documents(cfg)
    assert documents["text"][:] == DOCUMENTS[:6]
    assert documents.cache_files, "the streamed head should be cached so tokenization can be cached too"


def test_missing_tokenizer_says_how_to_create_it(tmp_path):
    with pytest.raises(ValueError, match="moe-train-tokenizer"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "absent")))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(source="s3"), "data.source"),
        (dict(source="files", path="jsonl", data_files=["a.jsonl"]), "data.path"),
        (dict(source="files", path="json"), "data.data_files"),
        (dict(source="hub"), "data.path"),
        (dict(source="hub", path="x/y", streaming=True), "data.max_documents"),
        (dict(max_documents=1), "data.max_documents"),
        (dict(seq_len=1), "data.seq_len"),
        (dict(val_fraction=0.0), "data.val_fraction"),
        (dict(val_fraction=1.0), "data.val_fraction"),
        (dict(num_proc=0), "data.num_proc"),
        (dict(text_field=""), "data.text_field"),
    ],
)
def test_validation_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**overrides).validate()


def test_settings_without_effect_warn():
    with pytest.warns(UserWarning, match="no effect with data.source=pydoc"):
        DataConfig(data_files=["a.txt"]).validate()


def test_tokenizer_command_rejects_a_vocabulary_without_merges(tmp_path):
    with pytest.raises(ValueError, match="--vocab-size=258"):
        tokenizer_command.main(["--vocab-size", "258", "--output", str(tmp_path / "tok"), "--cache-dir", str(tmp_path)])


# Rows hold their own index so that a batch shows which rows it read.
NUM_ROWS = 10
BLOCKS = torch.arange(NUM_ROWS).unsqueeze(1).repeat(1, 3)


def global_batch_rows(step: int, world_size: int, micro_batch_size: int, grad_accum: int, seed: int = 0) -> list[int]:
    """All rows of an optimizer step, micro step by micro step, ranks concatenated in rank order."""
    rows = []
    for micro_step in range(grad_accum):
        for rank in range(world_size):
            batch = train_micro_batch(BLOCKS, step=step, micro_step=micro_step, rank=rank, world_size=world_size,
                                      micro_batch_size=micro_batch_size, grad_accum=grad_accum, seed=seed)
            assert batch.shape == (micro_batch_size, 3)
            rows += batch[:, 0].tolist()
    return rows


def test_train_micro_batch_matches_the_epoch_permutation_formula():
    rows = []
    for step in range(5):
        rows += global_batch_rows(step, world_size=2, micro_batch_size=2, grad_accum=1, seed=7)
    expected = []
    for g in range(20):
        epoch, position = divmod(g, NUM_ROWS)
        expected.append(torch.randperm(NUM_ROWS, generator=torch.Generator().manual_seed(7 + epoch))[position].item())
    assert rows == expected
    # Each epoch reads every row once, in a different order from the next epoch.
    assert sorted(rows[:10]) == sorted(rows[10:]) == list(range(NUM_ROWS))
    assert rows[:10] != rows[10:]


def test_global_batch_does_not_depend_on_world_size():
    for step in range(4):
        for grad_accum in (1, 3):
            one_rank = global_batch_rows(step, world_size=1, micro_batch_size=4, grad_accum=grad_accum)
            assert global_batch_rows(step, world_size=2, micro_batch_size=2, grad_accum=grad_accum) == one_rank
            assert global_batch_rows(step, world_size=4, micro_batch_size=1, grad_accum=grad_accum) == one_rank


def test_train_micro_batch_is_pure_so_resuming_needs_only_the_step():
    kwargs = dict(micro_step=1, rank=1, world_size=2, micro_batch_size=3, grad_accum=2, seed=5)
    later = train_micro_batch(BLOCKS, step=9, **kwargs)
    for step in range(9):
        train_micro_batch(BLOCKS, step=step, **kwargs)
    assert torch.equal(train_micro_batch(BLOCKS, step=9, **kwargs), later)
    assert not torch.equal(train_micro_batch(BLOCKS, step=9, **{**kwargs, "seed": 6}), later)


def test_train_micro_batch_rejects_out_of_range_positions():
    kwargs = dict(step=0, world_size=2, micro_batch_size=1, grad_accum=2, seed=0)
    with pytest.raises(ValueError, match="micro_step=2"):
        train_micro_batch(BLOCKS, micro_step=2, rank=0, **kwargs)
    with pytest.raises(ValueError, match="rank=2"):
        train_micro_batch(BLOCKS, micro_step=0, rank=2, **kwargs)


def test_eval_batches_have_equal_count_and_disjoint_rows_per_rank():
    world_size, micro_batch_size = 3, 2
    per_rank = [eval_micro_batches(BLOCKS, rank=r, world_size=world_size, micro_batch_size=micro_batch_size)
                for r in range(world_size)]
    assert [len(batches) for batches in per_rank] == [1, 1, 1]  # 10 rows // 6 per global batch; 4 rows dropped
    rows = [row for batches in per_rank for batch in batches for row in batch[:, 0].tolist()]
    assert sorted(rows) == list(range(6))
    capped = [eval_micro_batches(BLOCKS, rank=r, world_size=2, micro_batch_size=2, max_batches=1) for r in range(2)]
    assert [len(batches) for batches in capped] == [1, 1]
    with pytest.raises(ValueError, match="fewer than one eval batch"):
        eval_micro_batches(BLOCKS, rank=0, world_size=4, micro_batch_size=3)
