"""ListOps (Nangia & Bowman 2018), as used by the Long Range Arena (Tay et al. 2021), generated on the fly.

An example is a prefix expression over the operators ``MIN``, ``MAX``, ``MED`` (median) and ``SM``
(sum modulo 10) and the digits 0-9, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (value 9); the label is the
expression's value, so the task has 10 classes. Tokens are ``[MIN``, ``[MAX``, ``[MED``, ``[SM``,
the digits ``0``..``9`` and ``]``.

Median convention: ``MED`` of an even number of arguments takes the *lower* of the two middle values
after sorting (``statistics.median_low``), so every value stays a digit. (LRA's own script takes
``int(np.median(x))``, the truncated mean of the two middle values, which can differ by a few
units; the task is equally well defined either way.)

Generation follows LRA's script: a tree is sampled top-down; each node below ``max_depth`` is a
digit leaf with probability ``leaf_prob`` (0.75, LRA's ``1 - VALUE_P``) and otherwise an operator
(uniform over the four) with a uniform number of arguments in ``2..max_args``; nodes at
``max_depth`` are leaves. Trees whose token count falls outside ``[min_length, max_length]`` are
rejected and resampled. Two shortcuts keep this fast without changing the distribution of the
accepted trees: when ``min_length > 1`` the root is drawn as an operator (a leaf root would be
rejected anyway), and a tree is abandoned as soon as its tokens so far plus the least it still owes
(one token per pending argument and a ``]`` per open operator) exceed ``max_length``. Random numbers are drawn from numpy in blocks.

The dataset generates lazily: item ``i`` of a split is built from
``np.random.default_rng([seed, split_index, i])``, so construction is instant, memory is flat and
any item can be regenerated on its own.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.registry import check_int, check_split, register_dataset, split_size

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
DIGITS = tuple(str(d) for d in range(10))
CLOSE = "]"
PAD_ID, CLS_ID = 0, 1
SYMBOLS = OPERATORS + DIGITS + (CLOSE,)
VOCAB = {"<pad>": PAD_ID, "<cls>": CLS_ID, **{s: i + 2 for i, s in enumerate(SYMBOLS)}}
DEFAULT_NUM_EXAMPLES = {"train": 96000, "val": 2000, "test": 2000}
LEAF_PROB = 0.75
MAX_TRIES = 100_000
_BLOCK = 512


def _apply(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return sorted(args)[(len(args) - 1) // 2]  # lower middle for an even count
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def evaluate_listops(tokens: list[str]) -> int:
    """Value (0-9) of a ListOps expression given as tokens; ValueError if it is malformed.

    Iterative (a stack of open operators), so depth is not limited by Python's recursion limit.
    """
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for position, token in enumerate(tokens):
        if result is not None:
            raise ValueError(f"tokens continue after the expression ended, at position {position}: {token!r}")
        if token in OPERATORS:
            stack.append((token, []))
            continue
        if token in DIGITS:
            value = int(token)
        elif token == CLOSE:
            if not stack:
                raise ValueError(f"unmatched ']' at position {position}")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op} closed without arguments at position {position}")
            value = _apply(op, args)
        else:
            raise ValueError(f"unknown token {token!r} at position {position}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if result is None:
        raise ValueError("incomplete expression: " + ("no tokens" if not stack else f"{len(stack)} unclosed operator(s)"))
    return result


def max_expression_length(max_depth: int, max_args: int) -> int:
    """Token count of the largest tree: every node above ``max_depth`` an operator with ``max_args`` arguments."""
    length = 1
    for _ in range(max_depth):
        length = 2 + max_args * length
    return length


def _check_arguments(min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    check_int("min_length", min_length, 1)
    check_int("max_length", max_length, 1)
    check_int("max_depth", max_depth, 0)
    check_int("max_args", max_args, 2)
    if min_length > max_length:
        raise ValueError(f"min_length must be <= max_length, got min_length={min_length} > max_length={max_length}")
    if min_length > 1 and max_length < 4:
        raise ValueError(f"max_length must be >= 4 (the shortest operator expression) when min_length > 1, "
                         f"got max_length={max_length}")
    if min_length > 1 and max_depth == 0:
        raise ValueError(f"max_depth=0 only allows single digits; min_length must be 1, got min_length={min_length}")
    longest = max_expression_length(max_depth, max_args)
    if min_length > longest:
        raise ValueError(f"min_length={min_length} exceeds the longest expression possible with "
                         f"max_depth={max_depth}, max_args={max_args} ({longest} tokens)")


class _Draws:
    """Per-node random numbers drawn from numpy in blocks (one numpy call per block, not per node)."""

    def __init__(self, rng: np.random.Generator, max_args: int):
        self.rng, self.max_args, self.i, self.n = rng, max_args, 0, 0

    def next(self) -> tuple[float, int, int, int]:
        if self.i == self.n:
            rng = self.rng
            self.u = rng.random(_BLOCK).tolist()
            self.op = rng.integers(0, len(OPERATORS), _BLOCK).tolist()
            self.nargs = rng.integers(2, self.max_args + 1, _BLOCK).tolist()
            self.digit = rng.integers(0, 10, _BLOCK).tolist()
            self.i, self.n = 0, _BLOCK
        i = self.i
        self.i += 1
        return self.u[i], self.op[i], self.nargs[i], self.digit[i]


def _sample_tree(draws: _Draws, max_length: int, max_depth: int, leaf_prob: float, root_operator: bool) -> list[str] | None:
    """One tree in prefix order, or None once it is sure to exceed ``max_length`` tokens."""
    tokens: list[str] = []
    remaining: list[int] = []  # arguments still to generate, per open operator (its depth is its index)
    owed = 0  # a lower bound on the tokens still to come: sum(remaining) + len(remaining) (a token per argument, a ']' each)
    while True:
        u, op, nargs, digit = draws.next()
        depth = len(remaining)
        if depth < max_depth and (u >= leaf_prob or (root_operator and depth == 0)):
            tokens.append(OPERATORS[op])
            remaining.append(nargs)
            owed += nargs + 1
        else:
            tokens.append(DIGITS[digit])
            while remaining:  # a subtree is complete: count it, closing every operator it completes
                remaining[-1] -= 1
                owed -= 1
                if remaining[-1]:
                    break
                remaining.pop()
                tokens.append(CLOSE)
                owed -= 1
        if len(tokens) + owed > max_length:
            return None
        if not remaining:
            return tokens


def generate_expression(rng: np.random.Generator, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
                        max_args: int = 10, leaf_prob: float = LEAF_PROB, max_tries: int = MAX_TRIES) -> list[str]:
    """A random ListOps expression (tokens) with ``min_length <= len(tokens) <= max_length``.

    Trees are sampled as described in the module docstring and rejected until one fits; after
    ``max_tries`` rejections a RuntimeError says the bounds are too unlikely for these settings.
    """
    _check_arguments(min_length, max_length, max_depth, max_args)
    if not 0 < leaf_prob < 1:
        raise ValueError(f"leaf_prob must be in (0, 1), got leaf_prob={leaf_prob!r}")
    check_int("max_tries", max_tries, 1)
    draws = _Draws(rng, max_args)
    for _ in range(max_tries):
        tokens = _sample_tree(draws, max_length, max_depth, leaf_prob, root_operator=min_length > 1)
        if tokens is not None and len(tokens) >= min_length:
            return tokens
    raise RuntimeError(f"no ListOps expression of {min_length}..{max_length} tokens in {max_tries} tries "
                       f"(max_depth={max_depth}, max_args={max_args}); widen the length bounds or raise max_depth/max_args")


@register_dataset("listops")
class ListOps(Dataset):
    """LRA ListOps: classify the value (0-9) of a nested MIN/MAX/MED/SM expression.

    Items: ``input_ids`` LongTensor[seq_len] (CLS, the expression's token ids, then PAD), ``mask``
    BoolTensor[seq_len] (True on CLS and the expression) and ``label`` (LongTensor scalar, the value).
    ``seq_len = max_length + 1``. Vocabulary: 0 = pad, 1 = CLS, then ``[MIN [MAX [MED [SM 0..9 ]``
    (``VOCAB``). Defaults follow LRA: 96000/2000/2000 examples, 500-2000 tokens, depth 10, 10 arguments.
    """

    task = "sequence_classification"
    num_classes = 10
    vocab = VOCAB
    vocab_size = len(VOCAB)

    def __init__(self, split: str = "train", num_examples: int | dict[str, int] | None = None, min_length: int = 500,
                 max_length: int = 2000, max_depth: int = 10, max_args: int = 10, seed: int = 0):
        self.split_index = check_split(split)
        check_int("seed", seed, 0)
        num_examples = split_size(num_examples, split, DEFAULT_NUM_EXAMPLES)
        _check_arguments(min_length, max_length, max_depth, max_args)
        self.split, self.num_examples, self.seed = split, num_examples, seed
        self.min_length, self.max_length, self.max_depth, self.max_args = min_length, max_length, max_depth, max_args
        self.seq_len = max_length + 1

    def __len__(self) -> int:
        return self.num_examples

    def tokens(self, i: int) -> list[str]:
        """The expression of item ``i`` as tokens (deterministic in seed, split and i)."""
        if not -self.num_examples <= i < self.num_examples:
            raise IndexError(f"index {i} out of range for {self.num_examples} examples")
        i %= self.num_examples
        rng = np.random.default_rng([self.seed, self.split_index, i])
        return generate_expression(rng, self.min_length, self.max_length, self.max_depth, self.max_args)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens(i)
        input_ids = torch.zeros(self.seq_len, dtype=torch.long)
        input_ids[0] = CLS_ID
        input_ids[1 : len(tokens) + 1] = torch.tensor([VOCAB[t] for t in tokens], dtype=torch.long)
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[: len(tokens) + 1] = True
        return {"input_ids": input_ids, "mask": mask, "label": torch.tensor(evaluate_listops(tokens), dtype=torch.long)}
