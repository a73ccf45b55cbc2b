"""Train a byte-level BPE tokenizer on a corpus and save it as a `transformers` tokenizer folder.

    moe-train-tokenizer                          # the default: 4096 tokens on the embedded pydoc corpus, into
                                                 # data.tokenizer (assets/tokenizer)
    moe-train-tokenizer data=local_files data.path=text 'data.data_files=[my.txt]' tokenizer.vocab_size=8192 \
        output=runs/tok

Every argument is a Hydra override, as for moe-prepare-data and recipes/train.py. The corpus is the training
config's `data` section (data.source, data.path, data.data_files, data.name, data.split, data.text_field,
data.max_documents, data.streaming, data.cache_dir; +experiment=... works too), so a tokenizer trained with
`data.X=Y` matches a run with the same overrides. The command's own settings:

    tokenizer.vocab_size=N   size of the vocabulary, special tokens included (default 4096); a corpus too small to
                             learn that many merges gives fewer, with a warning naming both numbers
    output=DIR               folder to save into (default: data.tokenizer, the folder training reads); relative
                             paths start at the working directory

Exit codes: 0 done, 2 bad input (one message, nothing written).
"""

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from omegaconf import OmegaConf

from .data import load_documents, resolve_path
from .errors import check_output_folder, refuse_bad_input
from .prepare_data import compose_data_config

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Listed first so their ids are 0 and 1 whatever the vocabulary size.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
NUM_BYTES = 256


def check_vocab_size(vocab_size: int) -> None:
    min_vocab_size = NUM_BYTES + len(SPECIAL_TOKENS)
    if vocab_size <= min_vocab_size:
        raise ValueError(
            f"tokenizer.vocab_size={vocab_size} leaves no room for merges beyond the {NUM_BYTES} bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens; set it above {min_vocab_size}."
        )


def train_tokenizer(texts: Iterator[str], vocab_size: int, length: int | None = None) -> PreTrainedTokenizerFast:
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


@dataclass
class TokenizerSettings:
    vocab_size: int = 4096


@dataclass
class TokenizerCommand:
    """The command's own settings (the keys `tokenizer.*` and `output`), beside the training config's overrides."""

    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    output: str | None = None


def split_overrides(argv: Sequence[str]) -> tuple[TokenizerCommand, list[str]]:
    """The command's settings, typed by OmegaConf (a wrong type is refused), and the overrides of the training
    config. An argument that looks like an option is refused: every setting is `key=value`."""
    own, training = [], []
    for arg in argv:
        if arg.startswith("-"):
            raise ValueError(f"{arg}: moe-train-tokenizer takes Hydra overrides, not options: tokenizer.vocab_size=N, "
                             "output=DIR and data.*=... (see moe-train-tokenizer --help).")
        (own if arg.startswith(("tokenizer.", "output=")) else training).append(arg)
    settings = OmegaConf.merge(OmegaConf.structured(TokenizerCommand), OmegaConf.from_dotlist(own))
    return OmegaConf.to_object(settings), training


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return
    start = time.perf_counter()
    with refuse_bad_input("moe-train-tokenizer: error"):
        settings, overrides = split_overrides(argv)
        data_cfg = compose_data_config(overrides)
        vocab_size = settings.tokenizer.vocab_size
        check_vocab_size(vocab_size)
        output = resolve_path(settings.output if settings.output is not None else data_cfg.tokenizer)
        check_output_folder(output, "output" if settings.output is not None else "data.tokenizer")
        documents = load_documents(data_cfg)
    texts = list(documents[data_cfg.text_field])
    num_chars = sum(len(text) for text in texts)
    print(f"Corpus: {len(documents)} documents, {num_chars:,} characters (data.source={data_cfg.source}).", flush=True)

    print(f"Training a byte-level BPE with {vocab_size} tokens...", flush=True)
    tokenizer = train_tokenizer(iter(texts), vocab_size, length=len(texts))
    if len(tokenizer) < vocab_size:
        print(f"moe-train-tokenizer: warning: tokenizer.vocab_size={vocab_size:,} asked for, {len(tokenizer):,} "
              "learned: the corpus has too few distinct pairs to merge more; use a larger corpus or a smaller "
              "tokenizer.vocab_size (model.vocab_size must be at least the tokenizer's size).", file=sys.stderr,
              flush=True)

    tokenizer.save_pretrained(str(output))
    num_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    print(
        f"Saved {len(tokenizer)} tokens to {output} in {time.perf_counter() - start:.1f}s; "
        f"the corpus encodes to {num_tokens:,} tokens ({num_chars / num_tokens:.2f} characters per token).",
        flush=True,
    )


if __name__ == "__main__":
    main()
