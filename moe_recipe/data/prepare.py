"""Documents -> token store, once: parallel tokenization straight into the store's token files.

`datasets.map(num_proc=N, batched=True)` hands each worker a contiguous shard of the documents; every worker
appends its documents' tokens (each followed by EOS) to its own file, `<split>-<worker>.bin`, and returns only the
documents' lengths. The files in worker order are the documents in corpus order, so no second pass concatenates
them, and no intermediate Arrow copy of the tokens is written.
"""

import hashlib
import itertools
import json
import os
import time
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerFast

from .config import DataConfig
from .documents import (load_documents, resolve_path, source_description, source_files, split_documents,
                        tokenizer_fingerprint)
from .store import (MANIFEST, SPLITS, atomic_store, file_lock, new_manifest, token_dtype, tokenizer_entry,
                    write_manifest)

# The settings that decide a store's content (seq_len does not: blocks are cut when the store is read).
SOURCE_KEYS = ("source", "path", "data_files", "name", "split", "text_field", "streaming", "max_documents")


def default_store_path(cfg: DataConfig) -> Path:
    """Where a store of `cfg`'s source lives when data.store is unset: keyed by everything its content depends on."""
    key = {k: getattr(cfg, k) for k in SOURCE_KEYS}
    key.update(val_fraction=cfg.val_fraction, seed=cfg.seed, tokenizer=tokenizer_fingerprint(cfg))
    # A changed local file (size or modification time) gets a new store.
    key["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source_files(cfg) if f.is_file()]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return resolve_path(cfg.cache_dir) / "stores" / f"{cfg.source}-{digest}"


def _write_split(documents: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, text_field: str, folder: Path,
                 split: str, dtype: np.dtype, num_proc: int) -> dict:
    eos_token_id = tokenizer.eos_token_id

    def tokenize_and_append(batch: dict[str, list[str]], rank: int | None) -> dict[str, list[int]]:
        input_ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        lengths = [len(ids) + 1 for ids in input_ids]
        tokens = np.fromiter(itertools.chain.from_iterable(ids + [eos_token_id] for ids in input_ids), dtype=dtype,
                             count=sum(lengths))
        with (folder / f"{split}-{rank or 0:05d}.bin").open("ab") as f:
            f.write(tokens.tobytes())
        return {"num_tokens": lengths}

    lengths = documents.map(
        tokenize_and_append,
        batched=True,
        with_rank=True,
        remove_columns=documents.column_names,
        num_proc=num_proc if num_proc > 1 and len(documents) > 1 else None,
        load_from_cache_file=False,  # the files are the output, so the function must run
        keep_in_memory=True,
        desc=f"Tokenizing {split}",
    )
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths["num_tokens"], dtype=np.int64), out=offsets[1:])
    np.save(folder / f"{split}-documents.npy", offsets)
    files = [
        {"path": path.name, "offset_bytes": 0, "num_tokens": path.stat().st_size // dtype.itemsize,
         "file_bytes": path.stat().st_size}
        for path in sorted(folder.glob(f"{split}-*.bin"))
    ]
    assert sum(f["num_tokens"] for f in files) == offsets[-1], "token files and document lengths disagree"
    return {"files": files, "num_tokens": int(offsets[-1]), "num_documents": len(lengths),
            "document_offsets": f"{split}-documents.npy"}


def build_store(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, target: Path, *, num_proc: int,
                overwrite: bool = False) -> dict:
    """Tokenize `cfg`'s documents into a new store at `target`; returns its manifest."""
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists; pass --overwrite to replace it.")
    start = time.perf_counter()
    documents = load_documents(cfg)
    if len(documents) < 2:
        raise ValueError(f"{source_description(cfg)} holds {len(documents)} document(s); the train and val splits need "
                         "at least one each. Add documents (with data.path=text each line is one).")
    train_indices, val_indices = split_documents(len(documents), cfg.val_fraction, cfg.seed)
    dtype = token_dtype(len(tokenizer))
    if num_proc > 1:
        # One process per core already; the tokenizer's own threads would only compete with them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with atomic_store(target, overwrite) as folder:
        splits = {
            split: _write_split(documents.select(indices), tokenizer, cfg.text_field, folder, split, dtype, num_proc)
            for split, indices in zip(SPLITS, (train_indices, val_indices))
        }
        sources = [{"path": str(f), "size_bytes": f.stat().st_size} for f in source_files(cfg)]
        manifest = new_manifest(
            tokenizer_entry(cfg.tokenizer, tokenizer_fingerprint(cfg), len(tokenizer), tokenizer.eos_token_id),
            dtype, splits, sources,
            source={k: getattr(cfg, k) for k in SOURCE_KEYS},
            split={"by": "document", "val_fraction": cfg.val_fraction, "seed": cfg.seed},
            seconds=round(time.perf_counter() - start, 2),
        )
        write_manifest(folder, manifest)
    return manifest


def build_store_on_first_use(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> Path:
    """The default store of `cfg`, built by whichever process gets the lock first; the others then read it."""
    target = default_store_path(cfg)
    if not (target / MANIFEST).is_file():
        with file_lock(target.parent / f".{target.name}.lock"):
            if not (target / MANIFEST).is_file():
                build_store(cfg, tokenizer, target, num_proc=cfg.num_proc)
    return target


def store_from_tokens(token_files: list[Path], val_files: list[Path], tokenizer: PreTrainedTokenizerFast,
                      tokenizer_name: str, tokenizer_sha256: str, target: Path, *, val_fraction: float,
                      dtype: str | None = None, overwrite: bool = False) -> dict:
    """A manifest for already tokenized flat files (nanoGPT .bin: raw tokens; .npy: a 1-D array), left in place.

    Without `val_files` the last `val_fraction` of the tokens is held out. The files are scanned once for their
    largest token id (it must fit the tokenizer) and their EOS count (the number of documents, informational).
    """
    vocab_size = len(tokenizer)
    expected = np.dtype(dtype) if dtype else token_dtype(vocab_size)
    entries = [_token_file_entry(f, expected, target) for f in token_files]
    val_entries = [_token_file_entry(f, expected, target) for f in val_files]
    if not val_entries:
        total = sum(e["num_tokens"] for e in entries)
        entries, val_entries = _split_entries(entries, total - max(1, round(total * val_fraction)), expected)
    splits = {}
    for split, split_entries in zip(SPLITS, (entries, val_entries)):
        max_id, num_eos = _scan(split_entries, expected, target, tokenizer.eos_token_id)
        if max_id >= vocab_size:
            raise ValueError(f"--from-tokens: the {split} tokens hold id {max_id}, outside the tokenizer's {vocab_size} "
                             f"ids ({tokenizer_name}); give the tokenizer the files were made with.")
        splits[split] = {"files": split_entries, "num_tokens": sum(e["num_tokens"] for e in split_entries),
                         "num_documents": num_eos, "document_offsets": None}
    manifest = new_manifest(
        tokenizer_entry(tokenizer_name, tokenizer_sha256, vocab_size, tokenizer.eos_token_id), expected, splits,
        [{"path": str(f.resolve()), "size_bytes": f.stat().st_size} for f in [*token_files, *val_files]],
        source={"from_tokens": [str(f.resolve()) for f in [*token_files, *val_files]]},
        split={"by": "file" if val_files else "token", "val_fraction": None if val_files else val_fraction},
    )
    if (target / MANIFEST).exists() and not overwrite:
        raise ValueError(f"{target / MANIFEST} already exists; pass --overwrite to replace it.")
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target / MANIFEST)
    return manifest


def _token_file_entry(path: Path, dtype: np.dtype, store: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"--from-tokens: {path} does not exist.")
    size = path.stat().st_size
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        if array.ndim != 1 or array.dtype != dtype:
            raise ValueError(f"--from-tokens: {path} holds a {array.ndim}-D {array.dtype} array; a token file is a "
                             f"1-D {dtype} array (or pass --dtype).")
        offset, num_tokens = array.offset, len(array)
    else:
        if size % dtype.itemsize:
            raise ValueError(f"--from-tokens: {path} has {size} bytes, not a whole number of {dtype} tokens; pass "
                             "--dtype or check that the file is complete.")
        offset, num_tokens = 0, size // dtype.itemsize
    if num_tokens == 0:
        raise ValueError(f"--from-tokens: {path} holds no tokens.")
    return {"path": os.path.relpath(path.resolve(), store.resolve()), "offset_bytes": offset, "num_tokens": num_tokens,
            "file_bytes": size}


def _split_entries(entries: list[dict], num_train: int, dtype: np.dtype) -> tuple[list[dict], list[dict]]:
    """Cut a list of file entries at token `num_train` into (train, val) entries."""
    train, val, seen = [], [], 0
    for entry in entries:
        take = min(max(num_train - seen, 0), entry["num_tokens"])
        if take:
            train.append({**entry, "num_tokens": take})
        if take < entry["num_tokens"]:
            val.append({**entry, "offset_bytes": entry["offset_bytes"] + take * dtype.itemsize,
                        "num_tokens": entry["num_tokens"] - take})
        seen += entry["num_tokens"]
    return train, val


def _scan(entries: list[dict], dtype: np.dtype, store: Path, eos_token_id: int, chunk: int = 1 << 24
          ) -> tuple[int, int]:
    max_id, num_eos = 0, 0
    for entry in entries:
        tokens = np.memmap(os.path.normpath(store.resolve() / entry["path"]), dtype=dtype, mode="r", offset=entry["offset_bytes"],
                           shape=(entry["num_tokens"],))
        for start in range(0, len(tokens), chunk):
            piece = tokens[start : start + chunk]
            max_id = max(max_id, int(piece.max()))
            num_eos += int(np.count_nonzero(piece == eos_token_id))
    return max_id, num_eos


__all__ = ["build_store", "build_store_on_first_use", "default_store_path", "store_from_tokens"]
