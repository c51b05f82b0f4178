"""Synthetic token tasks that isolate one ability of a sequence model (recall, selective copying, induction).

Every task is generated up front with numpy, deterministically from ``(seed, split)``: the three
splits draw from independent streams, so they never share examples by construction of the seed.
A task builds sequences of ``seq_len + 1`` tokens and an "answer" mask; items are the usual
next-token pair ``input_ids = seq[:-1]``, ``labels = seq[1:]`` with ``labels`` set to -100 (the
cross-entropy ignore index) everywhere except where the next token is an answer.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.registry import check_int, check_split, register_dataset, split_size

IGNORE_INDEX = -100
DEFAULT_NUM_EXAMPLES = {"train": 20000, "val": 1000, "test": 1000}


def sample_distinct(rng: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """``rows`` independent uniform k-subsets of ``range(population)``, each in random order.

    Floyd's algorithm vectorised over rows: k draws per row, no [rows, population] buffer.
    """
    out = np.empty((rows, k), dtype=np.int64)
    for i, j in enumerate(range(population - k, population)):
        t = rng.integers(0, j + 1, size=rows)
        taken = (out[:, :i] == t[:, None]).any(axis=1)
        out[:, i] = np.where(taken, j, t)
    return np.take_along_axis(out, rng.random((rows, k)).argsort(axis=1), axis=1)


def sample_weighted_distinct(rng: np.random.Generator, rows: int, p: np.ndarray, k: int) -> np.ndarray:
    """``rows`` draws of k distinct indices, sampled one after another with probability ∝ ``p``.

    Efraimidis-Spirakis: the k smallest of Exp(1)/p_i are distributed as k successive draws
    without replacement, and vectorise over rows.
    """
    scores = rng.exponential(size=(rows, len(p))) / p
    return np.argsort(scores, axis=1)[:, :k]


class TokenTask(Dataset):
    """Base of the synthetic tasks: holds ``input_ids`` and ``labels``, both LongTensor[N, seq_len].

    Subclasses validate their own arguments, then call ``__init__`` here, which calls their
    ``generate(rng, n) -> (sequences [n, seq_len + 1], answer mask [n, seq_len])``.
    """

    task = "lm"

    def __init__(self, split: str, vocab_size: int, seq_len: int, num_examples: int | dict[str, int] | None, seed: int):
        split_index = check_split(split)
        check_int("seed", seed, 0)
        num_examples = split_size(num_examples, split, DEFAULT_NUM_EXAMPLES)
        self.split, self.vocab_size, self.seq_len, self.seed = split, vocab_size, seq_len, seed
        sequences, answers = self.generate(np.random.default_rng([seed, split_index]), num_examples)
        self.input_ids = torch.from_numpy(sequences[:, :-1].copy())
        self.labels = torch.from_numpy(np.where(answers, sequences[:, 1:], IGNORE_INDEX))

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


@register_dataset("mqar")
class MQAR(TokenTask):
    """Multi-query associative recall: a context of key-value pairs, then every key queried once.

    Layout of the ``seq_len + 1`` tokens: ``k1 v1 k2 v2 ... kK vK`` (keys from ``[1, vocab/2)``,
    values from ``[vocab/2, vocab)``, all distinct within an example), then each key re-appears at
    ``2K + 2 * slot`` followed by its value, with the K slots drawn without replacement from
    ``1..(seq_len + 1 - 2K) // 2`` with probability ∝ ``power_a * gap ** (power_a - 1)`` (short gaps
    are favoured). Every other position holds a uniformly random token (``random_non_queries=True``,
    Zoology's default) or token 0, which no key or value uses. Only the answers (the value after a
    queried key) carry labels.
    """

    def __init__(self, split: str = "train", vocab_size: int = 8192, seq_len: int = 64, num_kv_pairs: int = 4,
                 num_examples: int | dict[str, int] | None = None, power_a: float = 0.01, random_non_queries: bool = True, seed: int = 0):
        check_int("num_kv_pairs", num_kv_pairs, 1)
        check_int("vocab_size", vocab_size, 2 * num_kv_pairs + 2)  # vocab_size // 2 > num_kv_pairs: room for distinct keys
        check_int("seq_len", seq_len, 1)
        if seq_len + 1 < 4 * num_kv_pairs:
            raise ValueError(f"seq_len + 1 must fit 4 * num_kv_pairs = {4 * num_kv_pairs} tokens (context and queries), "
                             f"got seq_len={seq_len!r} with num_kv_pairs={num_kv_pairs}")
        if not power_a > 0:
            raise ValueError(f"power_a must be > 0, got power_a={power_a!r}")
        self.num_kv_pairs, self.power_a, self.random_non_queries = num_kv_pairs, power_a, random_non_queries
        super().__init__(split, vocab_size, seq_len, num_examples, seed)

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        k, half, length = self.num_kv_pairs, self.vocab_size // 2, self.seq_len + 1
        keys = 1 + sample_distinct(rng, n, half - 1, k)
        values = half + sample_distinct(rng, n, self.vocab_size - half, k)
        filler = rng.integers(0, self.vocab_size, size=(n, length))
        sequences = filler if self.random_non_queries else np.zeros_like(filler)
        sequences[:, 0 : 2 * k : 2] = keys
        sequences[:, 1 : 2 * k : 2] = values

        gaps = np.arange(1, (length - 2 * k) // 2 + 1, dtype=np.float64)
        p = self.power_a * gaps ** (self.power_a - 1)
        query_positions = 2 * k + 2 * sample_weighted_distinct(rng, n, p / p.sum(), k)
        rows = np.arange(n)[:, None]
        sequences[rows, query_positions] = keys
        sequences[rows, query_positions + 1] = values

        answers = np.zeros((n, length - 1), dtype=bool)
        answers[rows, query_positions] = True
        return sequences, answers


@register_dataset("selective_copy")
class SelectiveCopy(TokenTask):
    """Selective copying: reproduce, in order, the data tokens scattered among noise.

    The first ``seq_len - num_tokens`` positions are noise token 0 with ``num_tokens`` data
    tokens (from ``[2, vocab_size)``) at random positions; then the separator token 1, after which
    the model must emit the data tokens in order (the labelled positions).
    """

    NOISE, SEPARATOR = 0, 1

    def __init__(self, split: str = "train", vocab_size: int = 16, seq_len: int = 64, num_tokens: int = 8,
                 num_examples: int | dict[str, int] | None = None, seed: int = 0):
        check_int("vocab_size", vocab_size, 3)
        check_int("num_tokens", num_tokens, 1)
        check_int("seq_len", seq_len, 2 * num_tokens)
        self.num_tokens = num_tokens
        super().__init__(split, vocab_size, seq_len, num_examples, seed)

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        m, region = self.num_tokens, self.seq_len - self.num_tokens
        data = rng.integers(2, self.vocab_size, size=(n, m))
        positions = np.sort(sample_distinct(rng, n, region, m), axis=1)
        sequences = np.full((n, self.seq_len + 1), self.NOISE, dtype=np.int64)
        sequences[np.arange(n)[:, None], positions] = data
        sequences[:, region] = self.SEPARATOR
        sequences[:, region + 1 :] = data
        answers = np.zeros((n, self.seq_len), dtype=bool)
        answers[:, region:] = True
        return sequences, answers


@register_dataset("induction")
class Induction(TokenTask):
    """Induction head: after ``... 0 t ... 0`` predict ``t``.

    Random tokens from ``[1, vocab_size)``; the trigger token 0 appears once at a uniformly random
    position in ``[0, seq_len - 2)`` followed by the target, and again as the last input token.
    Only the last position is labelled (with the target).
    """

    TRIGGER = 0

    def __init__(self, split: str = "train", vocab_size: int = 64, seq_len: int = 64,
                 num_examples: int | dict[str, int] | None = None, seed: int = 0):
        check_int("vocab_size", vocab_size, 3)
        check_int("seq_len", seq_len, 3)
        super().__init__(split, vocab_size, seq_len, num_examples, seed)

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(n)
        sequences = rng.integers(1, self.vocab_size, size=(n, self.seq_len + 1))
        trigger_positions = rng.integers(0, self.seq_len - 2, size=n)
        sequences[rows, trigger_positions] = self.TRIGGER
        sequences[:, -2] = self.TRIGGER
        sequences[:, -1] = sequences[rows, trigger_positions + 1]
        answers = np.zeros((n, self.seq_len), dtype=bool)
        answers[:, -1] = True
        return sequences, answers
