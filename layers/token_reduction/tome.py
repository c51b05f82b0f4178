"""ToMe: Token Merging (Bolya et al., ICLR 2023).

After the attention of every block, bipartite soft matching merges ``r`` tokens away: tokens are
alternately split into sets A (even positions) and B (odd positions); each A token finds its most
similar B token by cosine similarity of the attention keys (averaged over heads); the ``r`` A tokens
with the best matches are merged into them by size-weighted average. Token sizes (how many patches a
token holds) enter later attention as proportional attention, softmax(q k^T / sqrt(d) + log(size)),
so a merged token weighs as much as the tokens it replaced. The ``protected`` leading tokens (the CLS
token; with a distillation or register tokens, those too) neither merge away nor receive merges, and
stay first. ``r`` may exceed what one layer can merge: it is clipped to half the unprotected tokens,
``(N - protected) // 2``, with a warning.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from layers.token_reduction import tome_kernel
from layers.token_reduction.base import TokenReduction, Tokens, register_token_reduction


def tome_schedule(r: int | Sequence[int], depth: int, inflection: float = 0.0) -> list[int]:
    """Tokens merged per layer. ``r`` an int: ``r`` at every layer, or with ``inflection`` in [-1, 1]
    ToMe's linear schedule from ``r (1 - inflection)`` to ``r (1 + inflection)`` (the same total;
    negative: decreasing, more merging early); ``r`` a list: one value per layer."""
    if not -1.0 <= inflection <= 1.0:
        raise ValueError(f"inflection must be in [-1, 1], got {inflection}")
    if isinstance(r, (list, tuple)):
        if len(r) != depth or inflection:
            raise ValueError(f"r as a list needs one value per layer ({depth}) and no inflection, got {list(r)}")
        schedule = [int(v) for v in r]
    elif depth == 1 or not inflection:
        schedule = [int(r)] * depth
    else:
        first, last = r * (1.0 - inflection), r * (1.0 + inflection)
        schedule = [int(first + (last - first) * i / (depth - 1)) for i in range(depth)]
    if any(v < 0 for v in schedule):
        raise ValueError(f"r must be non-negative, got schedule {schedule}")
    return schedule


def clip_r(r: int, num_tokens: int, protected: int = 1) -> int:
    """``r`` limited to half the unprotected tokens (all but the ``protected`` leading ones), warning when it is cut."""
    limit = max(0, (num_tokens - protected) // 2)
    if r > limit:
        warnings.warn(f"ToMe: r={r} exceeds half the {num_tokens - protected} unprotected tokens; merging {limit}",
                      stacklevel=2)
    return min(r, limit)


class Matching:
    """The outcome of bipartite soft matching: ``rows[b, j]``, the output token that input token j
    joins, out of ``num_out`` = N - r. Tokens keep their order: the survivors (every token but the r
    merged A tokens, CLS first) in their original positions, each merged A token inside its B partner.

    A merge is a linear map from N tokens to N - r, so it runs as one batched matrix product with a
    [B, N - r, N] matrix holding one weight per column: the GEMM reads the tokens once, where gathers,
    scatters and concatenations would pass over them several times."""

    def __init__(self, rows: torch.Tensor, num_out: int):
        self.rows, self.num_out = rows, num_out

    def combine(self, weights: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: output row i is the sum of ``weights[b, j] t[b, j]`` over the tokens j
        with ``rows[b, j] = i``. The first N - N % 8 tokens go through one GEMM with the [B, N - r, N] merge
        matrix (a reduction length that is a multiple of 8 keeps cuBLAS on its tensor-core tiles: an odd
        one, such as 197 tokens, makes it fall back to a kernel ~3x slower); the last few are added in place."""
        (batch, n), dim = self.rows.shape, t.shape[-1]
        aligned = n - n % 8
        head = self.rows[:, :aligned]
        matrix = weights.new_zeros(batch, self.num_out, aligned).scatter_(1, head[:, None], weights[:, None, :aligned])
        out = matrix @ t[:, :aligned]  # bf16 under autocast, like every matmul there
        if aligned < n:
            tail = self.rows[:, aligned:, None].expand(-1, -1, dim)
            out = out.scatter_add_(1, tail, (t[:, aligned:] * weights[:, aligned:, None]).to(out.dtype))
        return out.to(t.dtype)

    def merge_sum(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: each output token is the sum of the tokens that joined it."""
        return self.combine(t.new_ones(self.rows.shape), t)

    def merge_average(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of merged tokens: (sum size_i x_i / sum size_i, sum size_i); size [B, N, 1]."""
        size = size[..., 0]
        new_size = size.new_zeros(size.shape[0], self.num_out).scatter_add_(1, self.rows, size)
        weights = size / new_size.gather(1, self.rows)
        return self.combine(weights.to(x.dtype), x), new_size[..., None]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> Matching:
    """Match the ``r`` most similar A tokens to B tokens; ``metric`` [B, N, C]; the first ``protected`` tokens
    (CLS, distillation, registers) neither merge away nor receive merges."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, Na, Nb] cosine similarities
    scores[:, :, : protected // 2] = float("-inf")  # protected B tokens (odd positions < protected) receive nothing
    best, best_b = scores.max(dim=-1)
    best[:, : (protected + 1) // 2] = float("-inf")  # protected A tokens never merge
    src = best.topk(r, dim=-1, sorted=False).indices  # the A tokens merged away
    survives = torch.ones_like(metric[..., 0], dtype=torch.bool)
    survives[:, ::2].scatter_(1, src, False)
    rows = survives.cumsum(dim=1).sub_(1)  # a survivor's output row: how many survivors precede it
    rows[:, ::2].scatter_(1, src, rows[:, 1::2].gather(1, best_b.gather(1, src)))  # merged: its partner's row
    return Matching(rows, metric.shape[1] - r)


def naive_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int,
                protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for one merge step by brute force (loops over tokens and pairs); same output order as
    :meth:`Matching.merge_average`: the surviving tokens in their original order."""
    xs, sizes = [], []
    for xb, mb, sb in zip(x, metric, size):
        set_a = list(range(protected + protected % 2, len(xb), 2))  # even positions past the protected tokens
        set_b = list(range(protected - protected % 2 + 1, len(xb), 2))  # odd positions past them
        best = {}
        for i in set_a:
            sims = [(torch.cosine_similarity(mb[i], mb[j], dim=0).item(), j) for j in set_b]
            best[i] = max(sims)
        merged_away = sorted(best, key=lambda i: best[i][0], reverse=True)[:r]
        groups = [[p] + [i for i in merged_away if best[i][1] == p] for p in range(len(xb)) if p not in merged_away]
        sizes.append(torch.stack([sum(sb[i] for i in g) for g in groups]))
        xs.append(torch.stack([sum(sb[i] * xb[i] for i in g) / sum(sb[i] for i in g) for g in groups]))
    return torch.stack(xs), torch.stack(sizes)


@register_token_reduction("tome")
class ToMe(TokenReduction):
    """Token merging after every block's attention (see module doc). ``r``: tokens merged per layer
    (int, or a list per layer); ``inflection``: ToMe's (r, inflection) schedule; ``proportional_attention``:
    add log(size) to attention logits; ``track_source``: keep ``last_tokens.source`` [B, N, N0], which
    original tokens each output token holds (for visualisation). ``prefix_tokens`` (set by the model): the
    leading tokens that are protected (CLS, plus a distillation or register tokens)."""

    def __init__(self, depth: int, r: int | list[int] = 16, inflection: float = 0.0, proportional_attention: bool = True,
                 track_source: bool = False, prefix_tokens: int = 1):
        super().__init__()
        if prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be at least 1 (the CLS token), got {prefix_tokens}")
        self.prefix_tokens = prefix_tokens
        self.schedule = tome_schedule(r, depth, inflection)
        self.proportional_attention = proportional_attention
        self.track_source = track_source

    needs_key_mean = True

    def reduces_at(self, layer: int) -> bool:
        return self.schedule[layer] > 0

    def reduce(self, x: torch.Tensor, tokens: Tokens, layer: int, key_mean: torch.Tensor,
               cls_attention: torch.Tensor | None) -> torch.Tensor:
        return self.reduce_residual(x, None, None, tokens, layer, key_mean, cls_attention)[0]

    def reduce_residual(self, x, update, norm, tokens, layer, key_mean, cls_attention):
        """On CUDA in inference the matching and the merge are two Triton launches instead of ~40 small ones,
        with the residual add and (an affine LayerNorm in x's dtype) ``norm`` fused into the merge
        (:mod:`layers.token_reduction.tome_kernel`); elsewhere the torch path, their reference."""
        r = clip_r(self.schedule[layer], x.shape[1], self.prefix_tokens)
        normed = None
        if r > 0 and tome_kernel.supports(x, r, update):
            fused_norm = norm if norm is not None and tome_kernel.fuses_norm(x, norm) else None
            x, tokens.size, rows, normed = tome_kernel.merge(x, key_mean, tokens.size, r, update=update, norm=fused_norm,
                                                             protected=self.prefix_tokens)
            matching = Matching(rows, x.shape[1])
        else:
            x = x if update is None else x + update
            if r == 0:
                return x, None if norm is None else norm(x)
            matching = bipartite_soft_matching(key_mean, r, self.prefix_tokens)
            size = tokens.size if tokens.size is not None else x.new_ones(*x.shape[:2], 1)
            x, tokens.size = matching.merge_average(x, size)
        if tokens.source is not None:
            tokens.source = matching.merge_sum(tokens.source)
        return x, normed if normed is not None or norm is None else norm(x)

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule}, proportional_attention={self.proportional_attention}, "
                f"prefix_tokens={self.prefix_tokens}")
