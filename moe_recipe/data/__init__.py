"""Data: documents -> a token store on disk (once, moe-prepare-data) -> memory-mapped blocks per (step, rank).

    config.py     DataConfig, MixtureComponent (the `data` section)
    documents.py  the embedded corpus, local files, hub datasets; the tokenizer
    store.py      the on-disk format: token files, document offsets, manifest; atomic writes, memory-mapped reads
    prepare.py    documents -> store, with every core; the store of a small source built on first use
    sampler.py    which blocks a rank reads at a step: a seeded Feistel permutation, mixtures
    open.py       config -> checked TrainingData
"""

from .config import FILE_BUILDERS, SOURCES, DataConfig, MixtureComponent
from .documents import (check_data_files, load_documents, load_tokenizer, resolve_path, split_documents,
                        tokenizer_fingerprint, tokenizer_path, write_pydoc_corpus)
from .open import open_training_data, store_components
from .prepare import build_store, build_store_on_first_use, default_store_path, store_from_tokens
from .sampler import TrainingData, permute
from .store import TokenStore, open_store

__all__ = [
    "FILE_BUILDERS",
    "SOURCES",
    "DataConfig",
    "MixtureComponent",
    "TokenStore",
    "TrainingData",
    "build_store",
    "build_store_on_first_use",
    "check_data_files",
    "default_store_path",
    "load_documents",
    "load_tokenizer",
    "open_store",
    "open_training_data",
    "permute",
    "resolve_path",
    "split_documents",
    "store_components",
    "store_from_tokens",
    "tokenizer_fingerprint",
    "tokenizer_path",
    "write_pydoc_corpus",
]
