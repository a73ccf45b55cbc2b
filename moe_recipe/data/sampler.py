"""Which token blocks each rank reads at each step: pure functions of (step, micro step, rank), O(1) memory.

Global sample g of the run (g = step * global_batch + micro_step * micro_batch * world_size + rank * micro_batch + j)
is mapped to a block in three steps, none of which needs memory proportional to the corpus:

1. Component: a fixed schedule of MIXTURE_PERIOD slots, filled greedily so that every prefix is as close to the
   weights as whole samples allow, assigns slot g % MIXTURE_PERIOD to a component c, and gives the sample its
   index k among c's samples. With one store, c = 0 and k = g.
2. Epoch: e, i = divmod(k, N_c) for the component's N_c blocks of seq_len tokens.
3. Block: a seeded Feistel permutation of [0, N_c), keyed by (seed, c, e), maps i to the block read. Each epoch
   reads every block once, in an order of its own.

The samples of a step are thus fixed by the global batch size alone, whatever the world size, and resuming needs
only the step. Shape legend: B rows of a batch, S seq_len, K mixture components.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .store import TokenStore

MIXTURE_PERIOD = 1000
FEISTEL_ROUNDS = 4
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _round_function(right: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
    z = (right ^ key) * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap around: the mixing relies on it
    z ^= z >> np.uint64(31)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(29)
    return z & mask


def permute(index: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to `index`: a balanced Feistel network on the smallest even power of two
    >= n, with cycle walking (re-encrypt until the value falls below n) to stay in range."""
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros(index.shape, dtype=np.int64)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
    keys, state = [], seed & _MASK64
    for _ in range(FEISTEL_ROUNDS):
        state = _splitmix64(state)
        keys.append(np.uint64(state))

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ _round_function(right, key, mask)
        return (left << shift) | right

    out = index.copy()
    pending = np.ones(out.shape, dtype=bool)
    while pending.any():
        out[pending] = encrypt(out[pending])
        pending &= out >= np.uint64(n)
    return out.astype(np.int64)


def epoch_seed(seed: int, component: int, epoch: int) -> int:
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ component) ^ epoch)


def mixture_schedule(weights: list[float], period: int = MIXTURE_PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(component of each slot, the slot's index among its component's slots, slots per component) for one period.

    Greedy: each slot goes to the component furthest behind its share, so any window of the schedule is within a
    sample or so of the weights.
    """
    shares = np.asarray(weights, dtype=np.float64) / sum(weights)
    components = np.empty(period, dtype=np.int64)
    index_in_component = np.empty(period, dtype=np.int64)
    counts = np.zeros(len(shares), dtype=np.int64)
    for slot in range(period):
        component = int(np.argmax(shares * (slot + 1) - counts))
        components[slot], index_in_component[slot] = component, counts[component]
        counts[component] += 1
    return components, index_in_component, counts


@dataclass
class Component:
    name: str
    store: TokenStore
    weight: float


class TrainingData:
    """The training and validation blocks of one or more token stores, read by memory map."""

    def __init__(self, components: list[Component], seq_len: int, seed: int) -> None:
        self.components = components
        self.seq_len = seq_len
        self.seed = seed
        self.num_train_blocks = [c.store.train.num_blocks(seq_len) for c in components]
        self.slot_component, self.slot_index, self.period_counts = mixture_schedule([c.weight for c in components])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    def sample_blocks(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(component, block) of each global sample index."""
        period, slot = np.divmod(samples, MIXTURE_PERIOD)
        component = self.slot_component[slot]
        index = period * self.period_counts[component] + self.slot_index[slot]
        num_blocks = np.asarray(self.num_train_blocks)[component]
        epoch, position = np.divmod(index, num_blocks)
        block = np.empty_like(position)
        for c, e in sorted(set(zip(component.tolist(), epoch.tolist()))):
            selected = (component == c) & (epoch == e)
            block[selected] = permute(position[selected], self.num_train_blocks[c], epoch_seed(self.seed, c, e))
        return component, block

    def train_micro_batch(self, *, step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int,
                          grad_accum: int) -> torch.LongTensor:
        """The [micro_batch_size, seq_len] rows that `rank` trains on at (`step`, `micro_step`)."""
        if not 0 <= micro_step < grad_accum:
            raise ValueError(f"micro_step={micro_step} must lie in [0, grad_accum={grad_accum}).")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}).")
        global_batch_size = micro_batch_size * grad_accum * world_size
        first = step * global_batch_size + micro_step * micro_batch_size * world_size + rank * micro_batch_size
        component, block = self.sample_blocks(np.arange(first, first + micro_batch_size, dtype=np.int64))
        rows_BS = np.empty((micro_batch_size, self.seq_len), dtype=np.int64)
        for c in set(component.tolist()):
            rows_BS[component == c] = self.components[c].store.train.blocks(block[component == c], self.seq_len)
        return torch.from_numpy(rows_BS)

    def step_counts(self, step: int, global_batch_size: int) -> np.ndarray:
        """[K] samples of each component in the global batch of `step` (the same on every rank)."""
        slots = np.arange(step * global_batch_size, (step + 1) * global_batch_size, dtype=np.int64) % MIXTURE_PERIOD
        return np.bincount(self.slot_component[slots], minlength=len(self.components))

    def eval_micro_batches(self, component: int, *, rank: int, world_size: int, micro_batch_size: int,
                           max_batches: int) -> Iterator[tuple[torch.LongTensor, int]]:
        """This rank's eval batches of one component's val split: ([micro_batch_size, seq_len] rows, how many of
        them are eval rows). The eval rows are the split's first min(max_batches x micro_batch_size, its blocks)
        blocks, whatever the world size, split by `eval_row_ranges`; the rows after them are zero padding, so that
        every rank runs the same number of forward passes of the same shape (the MoE layers' all-to-alls are
        collective). The caller leaves the padding rows out of the loss."""
        val = self.components[component].store.val
        num_rows = min(max_batches * micro_batch_size, val.num_blocks(self.seq_len))
        for start, stop in eval_row_ranges(num_rows, rank=rank, world_size=world_size,
                                           micro_batch_size=micro_batch_size):
            rows_BS = np.zeros((micro_batch_size, self.seq_len), dtype=np.int64)
            rows_BS[:stop - start] = val.blocks(np.arange(start, stop), self.seq_len)
            yield torch.from_numpy(rows_BS), stop - start

    def check_sizes(self, global_batch_size: int, setting: str) -> None:
        """Each store holds one global batch of training blocks and at least one validation block."""
        for i, c in enumerate(self.components):
            where = f"{setting}[{i}]" if len(self.components) > 1 else setting
            for split, needed, what in (("train", global_batch_size, "one global batch (micro_batch_size x "
                                         "grad_accum x world size)"),
                                        ("val", 1, "one block for evaluation")):
                num_blocks = getattr(c.store, split).num_blocks(self.seq_len)
                if num_blocks < needed:
                    raise ValueError(
                        f"{where}: the {split} split of the token store {c.store.path} has "
                        f"{getattr(c.store, split).num_tokens} tokens = {num_blocks} blocks of data.seq_len="
                        f"{self.seq_len}, fewer than {what} = {needed}; use a larger corpus, lower data.seq_len or "
                        f"{'raise data.val_fraction' if split == 'val' else 'the batch size'}."
                    )


def eval_row_ranges(num_rows: int, *, rank: int, world_size: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of `rank`'s eval rows in each of its eval batches: the rows [0, num_rows) in contiguous shares
    of ceil(num_rows / world_size), cut into batches of at most micro_batch_size. Every rank gets the same number of
    batches; a rank past the end of the rows gets short or empty ones (start == stop)."""
    rows_per_rank = -(-num_rows // world_size)
    first, end = min(rank * rows_per_rank, num_rows), min((rank + 1) * rows_per_rank, num_rows)
    starts = range(first, first + rows_per_rank, micro_batch_size)
    return [(min(start, end), min(start + micro_batch_size, end)) for start in starts]


__all__ = ["MIXTURE_PERIOD", "Component", "TrainingData", "epoch_seed", "eval_row_ranges", "mixture_schedule",
           "permute"]
