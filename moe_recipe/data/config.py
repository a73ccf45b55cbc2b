"""The `data` section of the recipe config: where documents come from, where their token store lives, how to mix."""

import warnings
from dataclasses import dataclass, field

SOURCES = ("pydoc", "files", "hub")
FILE_BUILDERS = ("json", "text", "parquet", "csv")


@dataclass
class MixtureComponent:
    """One prepared token store of a mixture and its share of the training samples."""

    name: str
    """Short name: the metric data/<name>_fraction and eval/<name>/loss."""
    store: str
    """Folder of a store written by moe-prepare-data (relative paths start at the working directory)."""
    weight: float
    """Relative share of training samples; weights are normalised to sum to 1."""


def _mixture_component(index: int, value) -> MixtureComponent:
    if isinstance(value, MixtureComponent):
        return value
    keys = ("name", "store", "weight")
    if not isinstance(value, dict) or sorted(value) != sorted(keys):
        raise ValueError(f"data.mixture[{index}]={value!r} must have exactly the keys {keys}, e.g. "
                         "{name: web, store: /data/stores/web, weight: 0.8}.")
    return MixtureComponent(name=str(value["name"]), store=str(value["store"]), weight=float(value["weight"]))


@dataclass
class DataConfig:
    source: str = "pydoc"
    """"pydoc": the CPython documentation shipped with the standard library; "files": local files; "hub": the hub."""
    path: str | None = None
    """Builder name for "files" (json, text, parquet, csv) or the dataset name for "hub"."""
    data_files: list[str] | None = None
    """Local files for "files" (relative paths start at the working directory), or data files of a hub dataset."""
    name: str | None = None
    """Hub dataset config name."""
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "assets/tokenizer"
    """Local tokenizer folder; a relative one not found from the working directory is looked up among the
    files shipped with the package (the default, assets/tokenizer, is: a clone's folder or the wheel's copy)."""
    seq_len: int = 128
    val_fraction: float = 0.05
    streaming: bool = False
    """Stream the first `max_documents` documents instead of downloading the whole dataset."""
    max_documents: int | None = None
    cache_dir: str = ".cache/data"
    seed: int = 0
    """Seeds the train/val split of the documents (at preparation) and the order of the training blocks."""
    num_proc: int = 1
    """Tokenizer processes when a store is built on first use (moe-prepare-data uses every core by default)."""
    store: str | None = None
    """Token store folder written by moe-prepare-data. Unset: a store under cache_dir keyed by the source settings
    and the tokenizer, built on first use (fine for small corpora; prepare large ones beforehand)."""
    mixture: list[MixtureComponent] = field(default_factory=list)
    """Train on several prepared stores at once, e.g. [{name: code, store: /data/code, weight: 0.2}, ...]. When set,
    the source settings and data.store are not used."""

    def __post_init__(self) -> None:
        # A plain dict from Hydra's resolved container becomes a typed component.
        self.mixture = [_mixture_component(i, c) for i, c in enumerate(self.mixture or [])]

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is unknown; set it to one of {SOURCES}.")
        if self.source == "files" and not self.mixture and self.store is None:
            if self.path not in FILE_BUILDERS:
                raise ValueError(
                    f"data.path={self.path!r} is not a file format; with data.source=files set data.path to one of "
                    f"{FILE_BUILDERS}."
                )
            if not self.data_files:
                raise ValueError("data.data_files is empty; with data.source=files list the files to read.")
        if self.source == "hub" and not self.path and not self.mixture and self.store is None:
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
        names = [component.name for component in self.mixture]
        for i, component in enumerate(self.mixture):
            if not component.weight > 0:
                raise ValueError(
                    f"data.mixture[{i}].weight={component.weight} (store {component.store!r}) must be > 0; "
                    "drop the component instead of giving it no weight."
                )
            if not component.name or component.name in names[:i]:
                raise ValueError(f"data.mixture[{i}].name={component.name!r} must be a non-empty name used once.")
        if self.mixture and self.store is not None:
            warnings.warn("data.store has no effect when data.mixture is set; list it in data.mixture.", stacklevel=2)


__all__ = ["FILE_BUILDERS", "SOURCES", "DataConfig", "MixtureComponent"]
