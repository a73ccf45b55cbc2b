"""From the `data` config to the training data: which stores, checked against the tokenizer and the batch sizes."""

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .config import DataConfig
from .documents import check_data_files, resolve_path, tokenizer_fingerprint
from .prepare import build_store_on_first_use
from .sampler import Component, TrainingData
from .store import check_tokenizer, open_store


def store_components(cfg: DataConfig) -> list[tuple[str, str, Path, float]]:
    """(name, setting, path, weight) of every store `cfg` trains on; None as path: the default store."""
    if cfg.mixture:
        return [(c.name, f"data.mixture[{i}].store", resolve_path(c.store), c.weight)
                for i, c in enumerate(cfg.mixture)]
    if cfg.store is not None:
        return [("main", "data.store", resolve_path(cfg.store), 1.0)]
    return [("main", "data.store", None, 1.0)]


def open_training_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, *, global_batch_size: int) -> TrainingData:
    """Open (and, for the default store of a source, build on first use) the stores; every check that can fail
    raises a ValueError naming the file or setting, before any process group exists."""
    cfg.validate()
    fingerprint = tokenizer_fingerprint(cfg)
    components = []
    for name, setting, path, weight in store_components(cfg):
        if path is None:
            check_data_files(cfg)
            path = build_store_on_first_use(cfg, tokenizer)
        store = open_store(path, setting)
        check_tokenizer(store, setting, fingerprint, len(tokenizer), cfg.tokenizer)
        components.append(Component(name, store, weight))
    data = TrainingData(components, cfg.seq_len, cfg.seed)
    data.check_sizes(global_batch_size, "data.mixture" if cfg.mixture else "data.store")
    return data


__all__ = ["open_training_data", "store_components"]
