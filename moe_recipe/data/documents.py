"""Documents in, before tokenization: the embedded pydoc corpus, local files, a hub dataset; and the tokenizer.

Everything that can be wrong with a user's data files (missing, empty, binary, corrupt) is turned into one
ValueError that names the file and the setting `data.data_files`.
"""

import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from pydoc_data.topics import topics as pydoc_topics
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..resources import project_path
from .config import DataConfig

TEXT_BUILDERS = ("json", "text", "csv")
SNIFF_BYTES = 64 * 1024


def resolve_path(path: str) -> Path:
    """A path the user gave (data files, cache, store, tokenizer): relative ones start at the working directory."""
    return Path(path).expanduser().absolute()


def tokenizer_path(cfg: DataConfig) -> Path:
    """data.tokenizer as a folder. A relative one that is not there from the working directory is looked up among
    the files shipped with the package, so the default `assets/tokenizer` works from any folder and in a wheel."""
    folder = resolve_path(cfg.tokenizer)
    if not folder.exists() and project_path(cfg.tokenizer).exists():
        return project_path(cfg.tokenizer)
    return folder


def write_pydoc_corpus(cache_dir: Path) -> Path:
    """Write the CPython topic documentation as JSONL, one `{"text": ...}` document per topic."""
    lines = "".join(json.dumps({"text": pydoc_topics[topic]}) + "\n" for topic in sorted(pydoc_topics))
    path = cache_dir / "pydoc" / "topics.jsonl"
    # Rewrite only when the content differs: datasets fingerprints local files by their modification time, so an
    # identical rewrite would throw away its Arrow cache.
    if path.exists() and path.read_text(encoding="utf-8") == lines:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(lines, encoding="utf-8")
    os.replace(tmp_path, path)
    return path


def check_data_files(cfg: DataConfig) -> None:
    """Local data files exist, are not empty, and text formats hold text: checked before `datasets` reads them."""
    if cfg.source != "files":
        return
    for name in cfg.data_files:
        path = resolve_path(name)
        if not path.is_file():
            raise ValueError(f"data.data_files: {path} does not exist (or is not a file); fix the path.")
        if path.stat().st_size == 0:
            raise ValueError(f"data.data_files: {path} is empty; give a file with documents in it.")
        if cfg.path in TEXT_BUILDERS:
            with path.open("rb") as f:
                head = f.read(SNIFF_BYTES)
            try:  # an incremental decoder: a cut multi-byte character at the end of the sniffed head is fine
                codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
                is_text = b"\0" not in head
            except UnicodeDecodeError:
                is_text = False
            if not is_text:
                raise ValueError(f"data.data_files: {path} is not UTF-8 text but data.path={cfg.path} reads text; "
                                 "give a text file or set data.path to its format (e.g. parquet).")


def _stream_documents(path: str, name: str | None, data_files: list[str] | None, split: str, text_field: str,
                      max_documents: int, cache_dir: str) -> Iterator[dict[str, str]]:
    stream = datasets.load_dataset(
        path, name=name, data_files=data_files, split=split, cache_dir=cache_dir, streaming=True
    )
    for row in stream.take(max_documents):
        yield {text_field: row[text_field]}


def source_description(cfg: DataConfig) -> str:
    if cfg.source == "files":
        return f"data.data_files={[str(resolve_path(f)) for f in cfg.data_files]}"
    if cfg.source == "hub":
        return f"data.path={cfg.path!r} (hub)"
    return "the embedded pydoc corpus"


def source_files(cfg: DataConfig) -> list[Path]:
    """The local files a corpus is read from (none for the hub)."""
    if cfg.source == "pydoc":
        return [write_pydoc_corpus(resolve_path(cfg.cache_dir))]
    if cfg.source == "files":
        return [resolve_path(f) for f in cfg.data_files]
    return []


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The corpus as a `Dataset` with one column, `cfg.text_field`, one row per document, cached under `cache_dir`."""
    cfg.validate()
    check_data_files(cfg)
    cache_dir = resolve_path(cfg.cache_dir)
    if cfg.source == "hub":
        path, name, data_files = cfg.path, cfg.name, cfg.data_files
    else:
        path = "json" if cfg.source == "pydoc" else cfg.path
        name, data_files = None, [str(f) for f in source_files(cfg)]
    hf_cache_dir = str(cache_dir / "hf")

    try:
        if cfg.streaming:
            # Materialize the head of the stream as a cached Arrow dataset; the rest of the pipeline is the same.
            documents = datasets.Dataset.from_generator(
                _stream_documents,
                cache_dir=hf_cache_dir,
                gen_kwargs=dict(path=path, name=name, data_files=data_files, split=cfg.split,
                                text_field=cfg.text_field, max_documents=cfg.max_documents, cache_dir=hf_cache_dir),
            )
        else:
            documents = datasets.load_dataset(
                path, name=name, data_files=data_files, split=cfg.split, cache_dir=hf_cache_dir
            )
    except Exception as err:  # datasets wraps parse errors in several types; the user needs the file and setting
        if cfg.source == "hub" and not isinstance(err, datasets.exceptions.DatasetGenerationError):
            raise
        cause = err.__cause__ or err
        raise ValueError(f"{source_description(cfg)} could not be read as data.path={path}: "
                         f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                         "; fix the file or set data.path to its format.") from err
    if cfg.max_documents is not None and cfg.max_documents < len(documents):
        documents = documents.select(range(cfg.max_documents))

    if cfg.text_field not in documents.column_names:
        raise ValueError(
            f"data.text_field={cfg.text_field!r} is not a column of {source_description(cfg)}; "
            f"set it to one of {documents.column_names}."
        )
    return documents.select_columns([cfg.text_field])


def load_tokenizer(cfg: DataConfig) -> PreTrainedTokenizerFast:
    folder = tokenizer_path(cfg)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"No tokenizer at {folder} (data.tokenizer={cfg.tokenizer!r}). Point data.tokenizer at a tokenizer folder, "
            f"or train one with `moe-train-tokenizer output={folder}` and your data.* overrides."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # tokenizers raises bare Exceptions for a file it cannot parse
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: {folder / 'tokenizer.json'} could not be loaded "
                         f"({type(err).__name__}: {err}); point data.tokenizer at a valid tokenizer folder.") from err
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer at {folder} has no eos_token; set one, documents are separated by it.")
    return tokenizer


def tokenizer_fingerprint(cfg: DataConfig) -> str:
    """sha256 of tokenizer.json: two tokenizers with the same hash encode every text the same way."""
    return hashlib.sha256((tokenizer_path(cfg) / "tokenizer.json").read_bytes()).hexdigest()


def split_documents(num_documents: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of document indices into (train, val), each in corpus order; both get at least one document."""
    if num_documents < 2:
        raise ValueError(
            f"The corpus has {num_documents} document(s); train and val need at least one each. Add documents."
        )
    num_val = min(max(1, round(num_documents * val_fraction)), num_documents - 1)
    permutation = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(permutation[num_val:]), sorted(permutation[:num_val])


__all__ = [
    "check_data_files",
    "load_documents",
    "load_tokenizer",
    "resolve_path",
    "source_files",
    "split_documents",
    "tokenizer_fingerprint",
    "tokenizer_path",
    "write_pydoc_corpus",
]
