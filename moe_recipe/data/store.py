"""The on-disk token store: flat token files, document boundaries, one JSON manifest; read by memory map.

A store is a folder:

    manifest.json           format, version, tokenizer (name, sha256 of tokenizer.json, vocab size, eos id), dtype,
                            per split: token files, token and document counts; source files and sizes; split settings
    train-00000.bin ...     the train documents' tokens, uint16 (uint32 when the vocabulary exceeds 65536), each
                            document followed by EOS, documents in corpus order, files concatenated in name order
    train-documents.npy     int64 document start offsets into the concatenated train tokens, plus the total at the end
    val-00000.bin ...       the same for the held-out validation documents
    val-documents.npy

A folder is written whole or not at all: it is built in a hidden temporary folder next to the target, synced, then
renamed into place. Nothing reads a folder without its manifest, and the manifest is written last.
"""

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ..files import fsync_path, fsync_tree

FORMAT = "moe-recipe-token-store"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenSplit:
    """One split of a store: the concatenation of its token files, memory-mapped (no copy in this process)."""

    name: str
    files_T: list[np.memmap]
    starts: np.ndarray
    """[files + 1] first token of each file in the concatenation, then the total."""
    num_documents: int | None

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def num_blocks(self, seq_len: int) -> int:
        return self.num_tokens // seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenation, copied out of the page cache."""
        pieces = []
        file = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[file + 1]))
            offset = int(self.starts[file])
            pieces.append(self.files_T[file][start - offset : end - offset])
            start, file = end, file + 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.array(pieces[0])

    def blocks(self, rows: np.ndarray, seq_len: int) -> np.ndarray:
        """[len(rows), seq_len] int64: block r is tokens [r * seq_len, (r + 1) * seq_len)."""
        out = np.empty((len(rows), seq_len), dtype=np.int64)
        for i, row in enumerate(rows.tolist()):
            out[i] = self.tokens(row * seq_len, (row + 1) * seq_len)
        return out


@dataclass
class TokenStore:
    path: Path
    manifest: dict
    train: TokenSplit
    val: TokenSplit

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])


def _resolve(store: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else store / path


def read_manifest(path: Path, setting: str) -> dict:
    """The manifest of the store at `path`, or a ValueError naming the folder and the setting that points at it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        what = "does not exist" if not path.exists() else f"has no {MANIFEST} (not a finished token store)"
        raise ValueError(
            f"{setting}: the token store {path} {what}. Prepare it with `moe-prepare-data <the same data.* "
            f"overrides>` (or `python -m moe_recipe.prepare_data`), or fix the path."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{setting}: {manifest_path} is not valid JSON ({err}); prepare the store again "
                         "with moe-prepare-data --overwrite.") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{setting}: {manifest_path} is not a {FORMAT} manifest of version {VERSION}; prepare the "
                         "store again with moe-prepare-data --overwrite.")
    return manifest


def open_store(path: Path, setting: str) -> TokenStore:
    """Open a store by memory map, after checking that every file is there and agrees with the manifest."""
    manifest = read_manifest(path, setting)
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for split in SPLITS:
        info = manifest["splits"][split]
        files, starts = [], [0]
        for entry in info["files"]:
            file = _resolve(path, entry["path"])
            if not file.is_file():
                raise ValueError(f"{setting}: {file}, a token file of the store {path}, is missing; prepare the "
                                 "store again with moe-prepare-data --overwrite.")
            size = file.stat().st_size
            if size != entry["file_bytes"]:
                raise ValueError(f"{setting}: {file} has {size} bytes but the manifest of {path} says "
                                 f"{entry['file_bytes']} (truncated or replaced); prepare the store again with "
                                 "moe-prepare-data --overwrite.")
            files.append(np.memmap(file, dtype=dtype, mode="r", offset=entry["offset_bytes"],
                                   shape=(entry["num_tokens"],)))
            starts.append(starts[-1] + entry["num_tokens"])
        if starts[-1] != info["num_tokens"]:
            raise ValueError(f"{setting}: the {split} files of {path} hold {starts[-1]} tokens but the manifest "
                             f"says {info['num_tokens']}; prepare the store again with moe-prepare-data --overwrite.")
        if info.get("document_offsets"):
            offsets_path = _resolve(path, info["document_offsets"])
            offsets = np.load(offsets_path, mmap_mode="r") if offsets_path.is_file() else None
            if offsets is None or len(offsets) != info["num_documents"] + 1 or int(offsets[-1]) != starts[-1]:
                raise ValueError(f"{setting}: the {split} document offsets {offsets_path} disagree with the "
                                 f"manifest of {path} ({info['num_documents']} documents, {starts[-1]} tokens); "
                                 "prepare the store again with moe-prepare-data --overwrite.")
        splits[split] = TokenSplit(split, files, np.array(starts, dtype=np.int64), info.get("num_documents"))
    return TokenStore(path, manifest, splits["train"], splits["val"])


def check_tokenizer(store: TokenStore, setting: str, tokenizer_sha256: str, vocab_size: int, tokenizer_name: str
                    ) -> None:
    expected = store.manifest["tokenizer"]
    if expected["sha256"] != tokenizer_sha256 or expected["vocab_size"] != vocab_size:
        raise ValueError(
            f"{setting}: the token store {store.path} was tokenized with {expected['name']!r} "
            f"({expected['vocab_size']} tokens, sha256 {expected['sha256'][:12]}) but data.tokenizer="
            f"{tokenizer_name!r} has {vocab_size} tokens, sha256 {tokenizer_sha256[:12]}; train with the store's "
            "tokenizer or prepare the store again with this one."
        )


# ---------------------------------------------------------------------------------------------------------------
# Writing: atomic folders, locks
# ---------------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Temporary folders of builds killed on this host (a kill -9 cannot clean up after itself)."""
    host = socket.gethostname()
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        _, _, rest = tmp.name.rpartition(".tmp-")
        tmp_host, _, pid = rest.rpartition("-")
        pid = pid.split("_")[0]
        if tmp_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_store(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on success it replaces `target` in one rename."""
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists; pass --overwrite to replace it (the old store is kept until the "
                         "new one is complete).")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
        fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on `path` for a `with` block, waiting as long as it takes (filelock's, an flock on Unix):
    ranks (and nodes, on file systems with working locks) take turns. The lock file stays behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def tokenizer_entry(name: str, sha256: str, vocab_size: int, eos_token_id: int | None) -> dict:
    return {"name": name, "sha256": sha256, "vocab_size": vocab_size, "eos_token_id": eos_token_id}


def new_manifest(tokenizer: dict, dtype: np.dtype, splits: dict, sources: list[dict], **extra) -> dict:
    return {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tokenizer": tokenizer, "dtype": dtype.name, "splits": splits, "sources": sources, **extra}


__all__ = [
    "MANIFEST",
    "TokenSplit",
    "TokenStore",
    "atomic_store",
    "check_tokenizer",
    "file_lock",
    "new_manifest",
    "open_store",
    "read_manifest",
    "token_dtype",
    "tokenizer_entry",
    "write_manifest",
]
