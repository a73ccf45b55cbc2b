"""Text corpus -> fixed-length token blocks, and the deterministic per-rank view of them.

The pipeline is: load documents with `datasets.load_dataset` (the embedded pydoc corpus, local files or a hub
dataset), split them into train and val by document, tokenize with a cached `Dataset.map`, append EOS to each
document, concatenate and cut into blocks of `seq_len` tokens. Blocks are fixed length so that every rank feeds
the same number of tokens per step.

Sharding is done by pure functions of (step, micro_step, rank): resuming a run needs only the step number, and
the rows of a global batch do not depend on how it is split across ranks.

Shape legend used in tensor names: N blocks, S seq_len.
"""

import functools
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from pydoc_data.topics import topics as pydoc_topics
from transformers import AutoTokenizer, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pydoc", "files", "hub")
FILE_BUILDERS = ("json", "text", "parquet", "csv")


@dataclass
class DataConfig:
    source: str = "pydoc"
    """"pydoc": the CPython documentation shipped with the standard library; "files": local files; "hub": the hub."""
    path: str | None = None
    """Builder name for "files" (json, text, parquet, csv) or the dataset name for "hub"."""
    data_files: list[str] | None = None
    """Local files for "files" (relative paths resolve against the repository root), or data files of a hub dataset."""
    name: str | None = None
    """Hub dataset config name."""
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "assets/tokenizer"
    """Local tokenizer folder; relative paths resolve against the repository root."""
    seq_len: int = 128
    val_fraction: float = 0.05
    streaming: bool = False
    """Stream the first `max_documents` documents instead of downloading the whole dataset."""
    max_documents: int | None = None
    cache_dir: str = ".cache/data"
    seed: int = 0
    num_proc: int = 1

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is unknown; set it to one of {SOURCES}.")
        if self.source == "files":
            if self.path not in FILE_BUILDERS:
                raise ValueError(
                    f"data.path={self.path!r} is not a file format; with data.source=files set data.path to one of "
                    f"{FILE_BUILDERS}."
                )
            if not self.data_files:
                raise ValueError("data.data_files is empty; with data.source=files list the files to read.")
        if self.source == "hub" and not self.path:
            raise ValueError(
                "data.path is unset; with data.source=hub set it to a dataset name, e.g. 'roneneldan/TinyStories'."
            )
        if self.source == "pydoc" and (self.path is not None or self.data_files or self.name is not None):
            warnings.warn(
                "data.path, data.data_files and data.name have no effect with data.source=pydoc; "
                "set data.source=files or data.source=hub to use them.",
                stacklevel=2,
            )
        if self.streaming and self.max_documents is None:
            raise ValueError(
                "data.streaming=true needs data.max_documents: set how many documents to take from the stream."
            )
        if self.max_documents is not None and self.max_documents < 2:
            raise ValueError(
                f"data.max_documents={self.max_documents} leaves no room for both a train and a val document; "
                "set it to at least 2 (or null for all)."
            )
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} is too short to predict a next token; set it to at least 2.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must lie strictly between 0 and 1, e.g. 0.05.")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc} must be at least 1.")
        if not self.text_field:
            raise ValueError("data.text_field is empty; set it to the column that holds the documents' text.")


@dataclass
class PackedSplits:
    train: torch.LongTensor
    """[N_train, seq_len] token blocks."""
    val: torch.LongTensor
    """[N_val, seq_len] token blocks."""
    num_train_documents: int
    num_val_documents: int

    @property
    def num_train_tokens(self) -> int:
        return self.train.numel()

    @property
    def num_val_tokens(self) -> int:
        return self.val.numel()


def resolve_path(path: str) -> Path:
    """Relative paths resolve against the repository root, so runs behave the same from any working directory."""
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else REPO_ROOT / resolved


def write_pydoc_corpus(cache_dir: Path) -> Path:
    """Write the CPython topic documentation as JSONL, one `{"text": ...}` document per topic."""
    lines = "".join(json.dumps({"text": pydoc_topics[topic]}) + "\n" for topic in sorted(pydoc_topics))
    path = cache_dir / "pydoc" / "topics.jsonl"
    # Rewrite only when the content differs: datasets fingerprints local files by their modification time, so an
    # identical rewrite would throw away the tokenization cache.
    if path.exists() and path.read_text(encoding="utf-8") == lines:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(lines, encoding="utf-8")
    os.replace(tmp_path, path)
    return path


def _stream_documents(path: str, name: str | None, data_files: list[str] | None, split: str, text_field: str,
                      max_documents: int, cache_dir: str) -> Iterator[dict[str, str]]:
    stream = datasets.load_dataset(
        path, name=name, data_files=data_files, split=split, cache_dir=cache_dir, streaming=True
    )
    for row in stream.take(max_documents):
        yield {text_field: row[text_field]}


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The corpus as a `Dataset` with one column, `cfg.text_field`, one row per document, cached under `cache_dir`."""
    cfg.validate()
    cache_dir = resolve_path(cfg.cache_dir)
    if cfg.source == "pydoc":
        path, name, data_files = "json", None, [str(write_pydoc_corpus(cache_dir))]
    elif cfg.source == "files":
        path, name, data_files = cfg.path, None, [str(resolve_path(f)) for f in cfg.data_files]
    else:
        path, name, data_files = cfg.path, cfg.name, cfg.data_files
    hf_cache_dir = str(cache_dir / "hf")

    if cfg.streaming:
        # Materialize the head of the stream as a cached Arrow dataset so the rest of the pipeline (split, cached
        # tokenization) is the same as for a downloaded dataset.
        documents = datasets.Dataset.from_generator(
            _stream_documents,
            cache_dir=hf_cache_dir,
            gen_kwargs=dict(path=path, name=name, data_files=data_files, split=cfg.split, text_field=cfg.text_field,
                            max_documents=cfg.max_documents, cache_dir=hf_cache_dir),
        )
    else:
        documents = datasets.load_dataset(
            path, name=name, data_files=data_files, split=cfg.split, cache_dir=hf_cache_dir
        )
        if cfg.max_documents is not None and cfg.max_documents < len(documents):
            documents = documents.select(range(cfg.max_documents))

    if cfg.text_field not in documents.column_names:
        raise ValueError(
            f"data.text_field={cfg.text_field!r} is not a column of the dataset; "
            f"set it to one of {documents.column_names}."
        )
    return documents.select_columns([cfg.text_field])


def load_tokenizer(cfg: DataConfig) -> PreTrainedTokenizerFast:
    folder = resolve_path(cfg.tokenizer)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"No tokenizer at {folder} (data.tokenizer={cfg.tokenizer!r}). Point data.tokenizer at a tokenizer folder, "
            f"or train one with `moe-train-tokenizer --output {folder}` (or `python -m moe_recipe.tokenizer ...`)."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer at {folder} has no eos_token; set one, documents are separated by it.")
    return tokenizer


def split_documents(num_documents: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of document indices into (train, val), each in corpus order; both get at least one document."""
    if num_documents < 2:
        raise ValueError(
            f"The corpus has {num_documents} document(s); train and val need at least one each. Add documents."
        )
    num_val = min(max(1, round(num_documents * val_fraction)), num_documents - 1)
    permutation = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(permutation[num_val:]), sorted(permutation[:num_val])


def tokenize_documents(documents: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, text_field: str,
                       num_proc: int = 1) -> datasets.Dataset:
    """One `input_ids` row per document, ending with EOS.

    The result is cached next to the documents' Arrow files under a fingerprint of the documents and of `tokenize`
    with its closure, tokenizer included: a second call with the same inputs reads the cache, another tokenizer
    gets its own.
    """
    eos_token_id = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        input_ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + [eos_token_id] for ids in input_ids]}

    return documents.map(
        tokenize,
        batched=True,
        remove_columns=documents.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        desc="Tokenizing",
    )


def pack_blocks(tokenized: datasets.Dataset, seq_len: int) -> torch.LongTensor:
    """Concatenate all `input_ids` in order and cut them into [N, seq_len] blocks, dropping the tail."""
    table = tokenized.with_format("arrow")[:]
    # np.array copies: Arrow buffers are read-only and torch warns on non-writable arrays.
    tokens = torch.from_numpy(np.array(table.column("input_ids").combine_chunks().flatten(), dtype=np.int64))
    num_blocks = tokens.numel() // seq_len
    return tokens[: num_blocks * seq_len].view(num_blocks, seq_len)


def prepare_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> PackedSplits:
    documents = load_documents(cfg)
    train_indices, val_indices = split_documents(len(documents), cfg.val_fraction, cfg.seed)
    blocks = {}
    for split_name, indices in (("train", train_indices), ("val", val_indices)):
        tokenized = tokenize_documents(documents.select(indices), tokenizer, cfg.text_field, cfg.num_proc)
        blocks[split_name] = pack_blocks(tokenized, cfg.seq_len)
        if len(blocks[split_name]) == 0:
            num_tokens = sum(len(ids) for ids in tokenized["input_ids"])
            raise ValueError(
                f"The {split_name} split has {len(indices)} document(s) and {num_tokens} tokens, fewer than one block "
                f"of data.seq_len={cfg.seq_len}; lower data.seq_len, raise data.val_fraction or use a larger corpus."
            )
    return PackedSplits(
        train=blocks["train"],
        val=blocks["val"],
        num_train_documents=len(train_indices),
        num_val_documents=len(val_indices),
    )


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_rows: int, seed: int) -> torch.Tensor:
    # Cached because every micro step of an epoch needs the same permutation; two entries cover an epoch boundary.
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))


def train_micro_batch(
    blocks_NS: torch.Tensor,
    *,
    step: int,
    micro_step: int,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    seed: int,
) -> torch.LongTensor:
    """The [micro_batch_size, seq_len] rows that `rank` trains on at (`step`, `micro_step`).

    Global sample g = step * global_batch + micro_step * (micro_batch_size * world_size) + rank * micro_batch_size + j
    reads row perm_e[g % N] of epoch e = g // N, with perm_e = randperm(N) seeded by seed + e. The samples of a step
    are thus fixed by the global batch size alone, whatever the world size, and resuming needs only `step`.
    """
    if not 0 <= micro_step < grad_accum:
        raise ValueError(f"micro_step={micro_step} must lie in [0, grad_accum={grad_accum}).")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}).")
    num_rows = len(blocks_NS)
    global_batch_size = micro_batch_size * grad_accum * world_size
    first = step * global_batch_size + micro_step * micro_batch_size * world_size + rank * micro_batch_size
    rows = []
    for g in range(first, first + micro_batch_size):
        epoch, position = divmod(g, num_rows)
        rows.append(_epoch_permutation(num_rows, seed + epoch)[position])
    return blocks_NS[torch.stack(rows)]


def eval_micro_batches(
    blocks_NS: torch.Tensor,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    max_batches: int | None = None,
) -> list[torch.LongTensor]:
    """This rank's [micro_batch_size, seq_len] eval batches: the same count on every rank, disjoint rows, no shuffle."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}).")
    rows_per_batch = micro_batch_size * world_size
    num_batches = len(blocks_NS) // rows_per_batch
    if num_batches == 0:
        raise ValueError(
            f"The val split has {len(blocks_NS)} blocks, fewer than one eval batch of micro_batch_size * world_size = "
            f"{rows_per_batch}; raise data.val_fraction, lower data.seq_len or lower the micro batch size."
        )
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    return [
        blocks_NS[b * rows_per_batch + rank * micro_batch_size : b * rows_per_batch + (rank + 1) * micro_batch_size]
        for b in range(num_batches)
    ]


__all__ = [
    "DataConfig",
    "PackedSplits",
    "eval_micro_batches",
    "load_documents",
    "load_tokenizer",
    "pack_blocks",
    "prepare_splits",
    "resolve_path",
    "split_documents",
    "tokenize_documents",
    "train_micro_batch",
    "write_pydoc_corpus",
]
