import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydoc_data.topics import topics
from transformers import AutoTokenizer

from moe_recipe import tokenizer as tokenizer_command
from moe_recipe.data import (
    DataConfig,
    build_store,
    build_store_on_first_use,
    default_store_path,
    load_documents,
    load_tokenizer,
    open_store,
    open_training_data,
    split_documents,
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
        "tokenizer.vocab_size=300", f"output={output}", f"data.cache_dir={cache_dir}",
        "data.source=files", "data.path=json", f"data.data_files=[{corpus_file}]",
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


def test_store_holds_train_documents_in_order_with_eos(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, val_fraction=0.2, seed=3)
    tokenizer = load_tokenizer(cfg)
    manifest = build_store(cfg, tokenizer, tmp_path / "store", num_proc=1)
    store = open_store(tmp_path / "store", "data.store")

    train_indices, val_indices = split_documents(len(DOCUMENTS), cfg.val_fraction, cfg.seed)
    for split, indices in ((store.train, train_indices), (store.val, val_indices)):
        expected, offsets = [], [0]
        for i in indices:
            expected += tokenizer(DOCUMENTS[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            offsets.append(len(expected))
        assert split.tokens(0, split.num_tokens).tolist() == expected
        assert np.load(tmp_path / "store" / f"{split.name}-documents.npy").tolist() == offsets
        assert split.num_documents == len(indices)
    assert store.dtype == np.uint16 and manifest["tokenizer"]["vocab_size"] == 300
    assert manifest["sources"] == [{"path": str(corpus_file), "size_bytes": corpus_file.stat().st_size}]


def test_parallel_preparation_writes_the_same_tokens(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path)
    tokenizer = load_tokenizer(cfg)
    build_store(cfg, tokenizer, tmp_path / "one", num_proc=1)
    build_store(cfg, tokenizer, tmp_path / "two", num_proc=2)
    one, two = open_store(tmp_path / "one", "x"), open_store(tmp_path / "two", "x")
    assert len(two.train.files_T) == 2  # one file per worker, concatenated in worker order
    for split in ("train", "val"):
        a, b = getattr(one, split), getattr(two, split)
        assert np.array_equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    # Blocks that straddle the two files read the same as in the one-file store.
    rows = np.arange(one.train.num_blocks(7))
    assert np.array_equal(one.train.blocks(rows, 7), two.train.blocks(rows, 7))


def test_default_store_is_built_once_and_keyed_by_source_and_tokenizer(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=8)
    first = build_store_on_first_use(cfg, load_tokenizer(cfg))
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert build_store_on_first_use(cfg, load_tokenizer(cfg)) == first
    assert (first / "manifest.json").stat().st_mtime_ns == mtime
    assert default_store_path(files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=16)) == first
    assert default_store_path(files_config(corpus_file, DataConfig().tokenizer, tmp_path)) != first
    assert default_store_path(files_config(corpus_file, tiny_tokenizer_dir, tmp_path, val_fraction=0.3)) != first


def test_train_and_val_are_disjoint_by_document(tmp_path, corpus_file, tiny_tokenizer_dir):
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, val_fraction=0.25)
    tokenizer = load_tokenizer(cfg)
    store = open_store(build_store_on_first_use(cfg, tokenizer), "x")
    train_markers = markers(torch.from_numpy(store.train.tokens(0, store.train.num_tokens)), tokenizer)
    val_markers = markers(torch.from_numpy(store.val.tokens(0, store.val.num_tokens)), tokenizer)
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
    cfg = files_config(corpus_file, tiny_tokenizer_dir, tmp_path, seq_len=64)
    with pytest.raises(ValueError, match="fewer than one block for evaluation.*raise data.val_fraction"):
        open_training_data(cfg, load_tokenizer(cfg), global_batch_size=2)


def test_text_files_give_one_document_per_line(tmp_path, tiny_tokenizer_dir):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(DOCUMENTS) + "\n")
    cfg = DataConfig(source="files", path="text", data_files=[str(text_file)], cache_dir=str(tmp_path / "cache"),
                     tokenizer=str(tiny_tokenizer_dir), seq_len=4)
    assert load_documents(cfg)["text"][:] == DOCUMENTS
    store = open_store(build_store_on_first_use(cfg, load_tokenizer(cfg)), "x")
    assert store.train.num_documents + store.val.num_documents == len(DOCUMENTS)


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


@pytest.mark.parametrize("args, message", [
    (["tokenizer.vocab_size=258"], "tokenizer.vocab_size=258 leaves no room for merges"),
    (["tokenizer.vocab_size=many"], "tokenizer.vocab_size='many' is not an integer"),
    (["tokenizer.vocab=300"], "did you mean tokenizer.vocab_size?"),
    (["data.sorce=files"], "data.sorce is not a setting"),
    (["--vocab-size", "300"], "--vocab-size: moe-train-tokenizer takes Hydra overrides, not options"),
])  # fmt: skip
def test_tokenizer_command_refuses_bad_settings_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_status:
        tokenizer_command.main([*args, f"output={tmp_path / 'tok'}", f"data.cache_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_status.value.code == 2 and err[-1].startswith("moe-train-tokenizer: error: ") and message in err[-1]
    assert not (tmp_path / "tok").exists()


def test_tokenizer_command_warns_when_the_corpus_gives_a_smaller_vocabulary(tmp_path, capsys, corpus_file):
    tokenizer_command.main(["tokenizer.vocab_size=1024", f"output={tmp_path / 'tok'}", f"data.cache_dir={tmp_path}",
                            "data.source=files", "data.path=json", f"data.data_files=[{corpus_file}]"])
    learned = len(AutoTokenizer.from_pretrained(tmp_path / "tok"))
    assert learned < 1024
    assert (f"moe-train-tokenizer: warning: tokenizer.vocab_size=1,024 asked for, {learned:,} learned"
            in capsys.readouterr().err)


def test_tokenizer_command_help_shows_the_usage(capsys):
    tokenizer_command.main(["--help"])
    assert "tokenizer.vocab_size=N" in capsys.readouterr().out
