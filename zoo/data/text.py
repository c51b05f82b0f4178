"""Byte-level language-modelling corpora: Python's own standard library, local text files, HF datasets.

All three produce a ``ByteWindows``: the split's documents are UTF-8 bytes joined by a 0 byte
(``DOC_SEPARATOR``; NUL never occurs in ordinary text or source, so it marks document boundaries
unambiguously) and cut into consecutive windows of ``seq_len + 1`` bytes that overlap by one
byte, so every byte but the first is a target once (a final partial window is dropped).
"""
from __future__ import annotations

import bisect
import functools
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.registry import SPLITS, check_int, check_split, register_dataset

DOC_SEPARATOR = b"\0"
PYTEXT_SPLIT_BUCKETS = (90, 95)  # crc32(path) % 100: [0, 90) train, [90, 95) val, [95, 100) test
HOLDOUT_FRACTION = 0.05  # share of an un-split corpus held out (halved into val and test)
DEFAULT_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


class ByteWindows(Dataset):
    """Next-byte prediction over one byte string: item i is bytes ``[i*seq_len, (i+1)*seq_len]`` shifted by one.

    ``files`` names the documents the string was built from, in order (for inspection and tests).
    """

    vocab_size = 256
    task = "lm"

    def __init__(self, data: bytes, seq_len: int, files: list[str]):
        check_int("seq_len", seq_len, 1)
        self.data = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        self.seq_len = seq_len
        self.files = files

    def __len__(self) -> int:
        return max(0, (len(self.data) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} windows")
        start = (i % n) * self.seq_len
        window = self.data[start : start + self.seq_len + 1].long()
        return {"input_ids": window[:-1], "labels": window[1:]}


def join_documents(documents: list[bytes], max_bytes: int | None = None) -> bytes:
    """Documents joined by ``DOC_SEPARATOR``, truncated to ``max_bytes`` when given."""
    data = DOC_SEPARATOR.join(documents)
    return data if max_bytes is None else data[:max_bytes]


def tail_split(data: bytes, split: str, fraction: float) -> bytes:
    """One split of a single byte string: train is the head; the last ``fraction`` is halved into val then test."""
    cut = len(data) - round(len(data) * fraction)
    middle = cut + (len(data) - cut) // 2
    return {"train": data[:cut], "val": data[cut:middle], "test": data[middle:]}[split]


@functools.lru_cache(maxsize=1)
def stdlib_sources() -> tuple[tuple[str, str], ...]:
    """``(relative posix path, absolute path)`` of the standard library's ``.py`` files, sorted by path.

    ``site-packages`` (third-party code, varies by machine) and ``__pycache__`` are pruned.
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found.append((Path(os.path.relpath(path, root)).as_posix(), path))
    return tuple(sorted(found))


def pytext_split_of(relative_path: str, seed: int = 0) -> str:
    """The split of a stdlib file: a stable CRC32 of its relative path mod 100 (see PYTEXT_SPLIT_BUCKETS).

    ``seed`` != 0 salts the hash, giving another (equally stable) file partition.
    """
    key = relative_path if seed == 0 else f"{seed}:{relative_path}"
    return SPLITS[bisect.bisect_right(PYTEXT_SPLIT_BUCKETS, zlib.crc32(key.encode()) % 100)]


@register_dataset("pytext")
def pytext(split: str = "train", seq_len: int = 256, max_bytes: int | None = None, seed: int = 0) -> ByteWindows:
    """The bytes of this Python's standard-library sources (~30 MB), split by file; always available offline.

    Files of the split are read in path order until ``max_bytes`` (a cap for fast tests) is reached;
    unreadable files are skipped.
    """
    check_split(split)
    check_int("seed", seed, 0)
    if max_bytes is not None:
        check_int("max_bytes", max_bytes, 1)
    documents, files, total = [], [], 0
    for relative, path in stdlib_sources():
        if max_bytes is not None and total >= max_bytes:
            break
        if pytext_split_of(relative, seed) != split:
            continue
        try:
            document = Path(path).read_bytes()
        except OSError:
            continue
        documents.append(document)
        files.append(relative)
        total += len(document) + len(DOC_SEPARATOR)
    return ByteWindows(join_documents(documents, max_bytes), seq_len, files)


@register_dataset("textfile")
def textfile(split: str = "train", *, path: str | os.PathLike, seq_len: int = 256,
             val_fraction: float = HOLDOUT_FRACTION) -> ByteWindows:
    """A local text file, or a directory of ``*.txt`` files (searched recursively), as bytes.

    With enough files that ``round(val_fraction * n_files) >= 2``, whole files are held out: files
    are ordered by the CRC32 of their relative path and the last ones are halved into val and test.
    Otherwise (e.g. one file) the concatenation is split by bytes: the last ``val_fraction`` of it
    is halved into val then test.
    """
    check_split(split)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction!r}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"textfile path {str(path)!r} does not exist")
    files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
    if sum(f.stat().st_size for f in files) == 0:
        raise ValueError(f"textfile path {str(path)!r} is empty "
                         f"(no text in {len(files)} file(s); a directory needs *.txt files)")
    names = {f: f.name if f == root else f.relative_to(root).as_posix() for f in files}

    held_out = round(val_fraction * len(files))
    if held_out >= 2:
        ordered = sorted(files, key=lambda f: (zlib.crc32(names[f].encode()), names[f]))
        head, tail = ordered[:-held_out], ordered[-held_out:]
        chosen = {"train": head, "val": tail[: held_out // 2], "test": tail[held_out // 2 :]}[split]
        return ByteWindows(join_documents([f.read_bytes() for f in chosen]), seq_len, [names[f] for f in chosen])
    data = join_documents([f.read_bytes() for f in files])
    return ByteWindows(tail_split(data, split, val_fraction), seq_len, [names[f] for f in files])


@register_dataset("hf")
def hf(split: str = "train", *, path: str, text_field: str = "text", seq_len: int = 256, config: str | None = None,
       split_map: dict[str, str] | None = None) -> ByteWindows:
    """A Hugging Face dataset's text column as bytes (needs the optional ``datasets`` package).

    ``path`` is a hub name (as ``datasets.load_dataset(path, config)`` takes it) or a local directory written by ``save_to_disk``. Our splits map to the
    dataset's through ``DEFAULT_HF_SPLITS`` updated by ``split_map`` (e.g. ``{"val": "valid"}``). A
    directory holding a single un-split ``Dataset`` is split like one text file: the last ``HOLDOUT_FRACTION``
    of its bytes is halved into val and test.
    """
    check_split(split)
    try:
        import datasets
    except ImportError:
        raise ImportError("the 'hf' dataset needs the 'datasets' package: pip install datasets") from None
    source_split = {**DEFAULT_HF_SPLITS, **(split_map or {})}[split]

    unsplit = False
    if Path(path).is_dir():
        loaded = datasets.load_from_disk(path)
        unsplit = not isinstance(loaded, datasets.DatasetDict)
        if not unsplit and source_split not in loaded:
            raise ValueError(f"hf dataset {path!r} has no split {source_split!r} (it has {', '.join(loaded)}); "
                             f"map ours onto it with split_map={{{split!r}: ...}}")
        table = loaded if unsplit else loaded[source_split]
    else:
        table = datasets.load_dataset(path, config, split=source_split)

    if text_field not in table.column_names:
        columns = ", ".join(table.column_names)
        raise ValueError(f"hf dataset {path!r} has no column text_field={text_field!r} (columns: {columns})")
    data = join_documents([text.encode("utf-8") for text in table[text_field]])
    return ByteWindows(tail_split(data, split, HOLDOUT_FRACTION) if unsplit else data, seq_len, [path])
