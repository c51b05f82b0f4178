"""Checks of ToMe's Triton kernels (:mod:`layers.token_reduction.tome_kernel`) against the torch path, shared by
the GPU tests and a CPU run under Triton's interpreter (``python tome_kernel_checks.py`` with TRITON_INTERPRET=1,
started by ``test_tome_kernel.py`` in a subprocess: the variable must be set before triton is imported).

Triton's interpreter computes bfloat16 dots wrongly (numpy has no bfloat16), so bfloat16 runs on the GPU only."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.token_reduction import tome_kernel  # noqa: E402
from layers.token_reduction.tome import Matching, bipartite_soft_matching  # noqa: E402

# matching scores are cosines: with 16-bit inputs to the dot each is off by up to ~2 ulp of the dtype
SCORE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# merged features and their LayerNorm, against the float32 torch path on the same rows (relative to the scale)
VALUE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_matching(metric: torch.Tensor, rows: torch.Tensor, r: int, score_tol: float, protected: int = 1) -> None:
    """``rows`` [B, N] is a ToMe matching of ``metric`` [B, N, D] (float32): exactly ``r`` A tokens (even positions)
    merged, each into a B token it matches best, the merged ones the best-matched, the first ``protected`` tokens
    neither merged nor receiving, survivors numbered in order; all up to ``score_tol`` in the cosine scores."""
    batch, n, _ = metric.shape
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
    scores[:, :, : protected // 2] = float("-inf")
    a_rows, b_rows = rows[:, ::2], rows[:, 1::2]
    joins = a_rows[:, :, None] == b_rows[:, None, :]  # A token merged into B token
    merged = joins.any(-1)
    assert (merged.sum(1) == r).all() and not merged[:, : (protected + 1) // 2].any(), "r unprotected A tokens merge"
    assert (joins.sum(-1) <= 1).all() and not joins[:, :, : protected // 2].any(), "protected B tokens receive nothing"
    best = scores.max(-1).values
    chosen = torch.where(joins, scores, float("-inf")).max(-1).values
    assert (best - chosen)[merged].max() <= score_tol, "a merged A token joins a B token it matches best"
    best[:, : (protected + 1) // 2] = float("-inf")
    weakest_merged = torch.where(merged, best, float("inf")).min(1).values
    strongest_kept = torch.where(merged, float("-inf"), best).max(1).values
    assert (strongest_kept - weakest_merged).max() <= score_tol, "the merged A tokens are the best-matched"
    survivors = torch.ones(batch, n, dtype=torch.bool, device=rows.device)
    survivors[:, ::2] = ~merged
    assert torch.equal(rows[survivors].view(batch, n - r), torch.arange(n - r, device=rows.device).expand(batch, -1))


def check_merge(device: str, dtype: torch.dtype, batch: int, n: int, channels: int, dim: int, r: int, sized: bool = True,
                with_update: bool = True, with_norm: bool = True, seed: int = 0, protected: int = 1) -> None:
    """:func:`tome_kernel.merge` on random inputs against the torch path: the matching (equal to
    :func:`bipartite_soft_matching`'s in float32, else optimal within 16-bit score rounding), the size-weighted
    average of ``x + update`` on those rows, the merged sizes and the fused LayerNorm."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    metric, x = rand(batch, n, dim), rand(batch, n, channels)
    update = rand(batch, n, channels) if with_update else None
    size = torch.randint(1, 6, (batch, n, 1), generator=g).to(device, dtype) if sized else None
    norm = None
    if with_norm:
        norm = torch.nn.LayerNorm(channels).to(device, dtype)
        with torch.no_grad():
            norm.weight.copy_(rand(channels)), norm.bias.copy_(rand(channels))
    got = tome_kernel.merge(x, metric, size, r, update=update, norm=norm, protected=protected)
    assert got.x.shape == (batch, n - r, channels) and got.x.dtype == dtype and got.size.shape == (batch, n - r, 1)
    assert got.size.dtype == dtype and got.rows.dtype == torch.long
    if dtype == torch.float32:
        assert torch.equal(got.rows, bipartite_soft_matching(metric, r, protected).rows)
    check_matching(metric.float(), got.rows, r, SCORE_TOL[dtype], protected)
    full = x.float() if update is None else x.float() + update.float()
    ones = torch.ones(batch, n, 1, device=device)
    want_x, want_size = Matching(got.rows, n - r).merge_average(full, size.float() if sized else ones)
    assert torch.equal(got.size.float(), want_size)
    assert (got.x.float() - want_x).abs().max() <= VALUE_TOL[dtype] * want_x.abs().max()
    if with_norm:
        want_normed = F.layer_norm(got.x.float(), (channels,), norm.weight.float(), norm.bias.float(), norm.eps)
        assert got.normed.dtype == dtype
        assert (got.normed.float() - want_normed).abs().max() <= VALUE_TOL[dtype] * want_normed.abs().max()
    else:
        assert got.normed is None


def check_ties(device: str) -> None:
    """Identical tokens (every score 1): each A token picks the first B token and the lowest-index A tokens merge."""
    metric = torch.ones(2, 11, 4, device=device)
    rows = tome_kernel.merge(torch.randn(2, 11, 8, device=device), metric, None, 3).rows
    check_matching(metric, rows, 3, 0.0)
    assert rows[0].tolist() == [0, 1, 1, 2, 1, 3, 1, 4, 5, 6, 7]  # A tokens 1-3 (positions 2, 4, 6) join B token 0 (row 1)


# (batch, n, channels, dim, r, sized, update, norm, protected): odd and even N, N = 5, r = 1, r = (N - protected) // 2,
# r over BLOCK_R (16), a distillation token (2 protected) and registers (5)
INTERPRETED_CASES = [(1, 197, 32, 64, 16, True, True, True, 1), (2, 8, 16, 16, 3, True, False, False, 1),
                     (1, 5, 8, 3, 2, False, True, False, 1), (1, 100, 24, 64, 49, True, True, True, 1),
                     (2, 37, 24, 24, 1, False, False, True, 1), (1, 90, 16, 32, 40, True, False, True, 1),
                     (1, 198, 16, 64, 16, True, True, True, 2), (2, 41, 16, 16, 18, True, False, False, 5)]


def run_interpreted() -> None:
    """The CPU cases, in float32 and float16 (under TRITON_INTERPRET=1)."""
    for dtype in (torch.float32, torch.float16):
        for i, (batch, n, channels, dim, r, sized, update, norm, protected) in enumerate(INTERPRETED_CASES):
            check_merge("cpu", dtype, batch, n, channels, dim, r, sized, update, norm, seed=i, protected=protected)
    check_ties("cpu")
    print(f"{2 * len(INTERPRETED_CASES) + 1} interpreted checks passed")


if __name__ == "__main__":
    run_interpreted()
