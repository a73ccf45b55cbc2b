"""Train a byte-level BPE tokenizer on a corpus and save it as a `transformers` tokenizer folder.

    moe-train-tokenizer                                   # the default: 4096 tokens on the embedded pydoc corpus
    moe-train-tokenizer --source files --path text --data-files my.txt --vocab-size 8192 --output runs/tok

The corpus flags mean the same as the `data` section of the training config, so a tokenizer trained with
`--source X --path Y` matches a run with `data.source=X data.path=Y`.
"""

import argparse
import time
from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .data import SOURCES, DataConfig, load_documents, resolve_path
from .errors import check_output_folder, refuse_bad_input

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Listed first so their ids are 0 and 1 whatever the vocabulary size.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
NUM_BYTES = 256


def check_vocab_size(vocab_size: int) -> None:
    min_vocab_size = NUM_BYTES + len(SPECIAL_TOKENS)
    if vocab_size <= min_vocab_size:
        raise ValueError(
            f"--vocab-size={vocab_size} leaves no room for merges beyond the {NUM_BYTES} bytes and "
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=4096, help="Size of the vocabulary, special tokens included.")
    parser.add_argument("--output", default=defaults.tokenizer,
                        help="Folder to save into; relative paths start at the working directory.")
    corpus = parser.add_argument_group("corpus (same meaning as the data section of the training config)")
    corpus.add_argument("--source", choices=SOURCES, default=defaults.source)
    corpus.add_argument("--path", help="json/text/parquet/csv for --source files; the dataset name for --source hub.")
    corpus.add_argument("--data-files", nargs="+",
                        help="Files for --source files (relative to the working directory), or a hub dataset's files.")
    corpus.add_argument("--name", help="Hub dataset config name.")
    corpus.add_argument("--split", default=defaults.split)
    corpus.add_argument("--text-field", default=defaults.text_field)
    corpus.add_argument("--max-documents", type=int, help="Train on the first N documents only.")
    corpus.add_argument("--streaming", action="store_true", help="Stream the hub dataset (needs --max-documents).")
    corpus.add_argument("--cache-dir", default=defaults.cache_dir,
                        help="Relative paths start at the working directory.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    data_cfg = DataConfig(
        source=args.source,
        path=args.path,
        data_files=args.data_files,
        name=args.name,
        split=args.split,
        text_field=args.text_field,
        max_documents=args.max_documents,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
    )
    start = time.perf_counter()
    output = resolve_path(args.output)
    with refuse_bad_input("moe-train-tokenizer: error"):
        check_vocab_size(args.vocab_size)
        check_output_folder(output, "--output")
        documents = load_documents(data_cfg)
    texts = list(documents[args.text_field])
    num_chars = sum(len(text) for text in texts)
    print(f"Corpus: {len(documents)} documents, {num_chars:,} characters (source={args.source}).", flush=True)

    print(f"Training a byte-level BPE with {args.vocab_size} tokens...", flush=True)
    tokenizer = train_tokenizer(iter(texts), args.vocab_size, length=len(texts))

    tokenizer.save_pretrained(str(output))
    num_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    print(
        f"Saved {len(tokenizer)} tokens to {output} in {time.perf_counter() - start:.1f}s; "
        f"the corpus encodes to {num_tokens:,} tokens ({num_chars / num_tokens:.2f} characters per token).",
        flush=True,
    )


if __name__ == "__main__":
    main()
