"""A byte-level tokenizer: token ids are the UTF-8 bytes, so any text round-trips with no vocabulary file."""
from __future__ import annotations

import torch


class ByteTokenizer:
    """Maps text to its UTF-8 bytes (ids 0..255) and back; invalid byte runs decode to U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return bytes(ids).decode("utf-8", errors="replace")
