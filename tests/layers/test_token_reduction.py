"""Token reduction methods (layers.token_reduction) on bare tensors: ToMe matching against a brute-force
reference and a hand-checked example, proportional attention, EViT, DynamicViT, patch dropout, registry."""
from __future__ import annotations

import pytest
import torch

from layers.token_reduction import (DynamicViT, EViT, PatchDropout, ToMe, bipartite_soft_matching,
                                    create_token_reduction, evit_reference, list_token_reductions, masked_softmax,
                                    naive_merge, tome_schedule)
from layers.token_reduction.evit import default_evit_layers


def test_registry_and_spec_errors():
    assert list_token_reductions() == ["dynamicvit", "evit", "patch_dropout", "tome"]
    assert isinstance(create_token_reduction({"name": "tome", "r": 2}, depth=3, dim=8), ToMe)
    with pytest.raises(ValueError, match="Did you mean: tome"):
        create_token_reduction({"name": "tomee"}, depth=3, dim=8)
    with pytest.raises(TypeError, match="unknown argument 'keep'.*Did you mean: keep_rate"):
        create_token_reduction({"name": "evit", "keep": 0.5}, depth=3, dim=8)
    with pytest.raises(TypeError, match="depth is set by the model"):
        create_token_reduction({"name": "tome", "depth": 3}, depth=3, dim=8)
    with pytest.raises(ValueError, match="'name' key"):
        create_token_reduction({"r": 3}, depth=3, dim=8)


# --- ToMe ----------------------------------------------------------------------------------------


def test_tome_schedule():
    assert tome_schedule(4, depth=3) == [4, 4, 4]
    assert tome_schedule([1, 0, 2], depth=3) == [1, 0, 2]
    decreasing = tome_schedule(8, depth=5, inflection=-0.5)  # ToMe's (r, inflection): 12 -> 4
    assert decreasing == [12, 10, 8, 6, 4] and sum(decreasing) == 8 * 5
    with pytest.raises(ValueError, match="r as a list"):
        tome_schedule([1, 2], depth=3)
    with pytest.raises(ValueError, match="inflection"):
        tome_schedule(4, depth=3, inflection=2.0)
    with pytest.raises(ValueError, match="r must be non-negative"):
        tome_schedule(-1, depth=2)


def test_tome_r0_is_identity():
    x, keys = torch.randn(2, 9, 4), torch.randn(2, 3, 9, 5)
    method = ToMe(depth=1, r=0)
    x0, tokens = method.start(x)
    assert tokens.reduce(x0, 0, keys, None) is x and not tokens.intercepts(0)


def test_tome_hand_checked_example():
    """5 tokens: A = {0 (CLS), 2, 4}, B = {1, 3}. Token 2's key is closest to token 1's (cos 0.995), token 4's
    to token 3's (cos 0.95): with r=1, token 2 (size 3) merges into token 1 (size 1)."""
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [1.0, 0.5]]])
    x = torch.tensor([[[float(i), 10.0 * i] for i in range(5)]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0]]])
    merged, new_size = bipartite_soft_matching(metric, r=1).merge_average(x, size)
    # the survivors in their order: CLS, 1 + 2, 3, 4
    torch.testing.assert_close(merged, torch.tensor([[[0.0, 0.0], [1.75, 17.5], [3.0, 30.0], [4.0, 40.0]]]))
    torch.testing.assert_close(new_size, torch.tensor([[[1.0], [4.0], [1.0], [1.0]]]))


@pytest.mark.parametrize("n,r,protected", [(11, 3, 1), (10, 4, 1), (17, 1, 1), (12, 5, 2), (15, 5, 5)])
def test_tome_matching_equals_brute_force(n, r, protected):
    """Also with a distillation token (2 protected) and registers (5 protected), r up to (N - protected) // 2."""
    x, metric = torch.randn(2, n, 6), torch.randn(2, n, 5)
    size = torch.randint(1, 4, (2, n, 1)).float()
    want_x, want_size = naive_merge(x, metric, size, r, protected)
    got_x, got_size = bipartite_soft_matching(metric, r, protected).merge_average(x, size)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_size, want_size)


def test_tome_sizes_and_sources_over_layers():
    x = torch.randn(2, 17, 6)
    method = ToMe(depth=3, r=[3, 2, 4], track_source=True)
    x, tokens = method.start(x)
    for layer in range(3):
        x = tokens.reduce(x, layer, torch.randn(2, 2, x.shape[1], 4), None)
    assert x.shape[1] == 17 - 9
    assert (tokens.size.sum(dim=1) == 17).all()
    torch.testing.assert_close(tokens.source.sum(dim=-1, keepdim=True), tokens.size)  # each token holds `size` patches
    assert (tokens.source.sum(dim=1) == 1).all()  # each original token is in exactly one output token
    assert (tokens.source[:, 0, 0] == 1).all() and (tokens.size[:, 0] == 1).all()  # the CLS token is untouched


def test_tome_protects_the_prefix_tokens():
    """With CLS + distillation token (prefix_tokens=2) both stay first and alone, even when their keys match
    others exactly; r is clipped to half of the N - 2 other tokens."""
    x = torch.randn(2, 12, 6)
    keys = torch.randn(2, 2, 12, 4)
    keys[:, :, 3] = keys[:, :, 0]  # token 3 (B) is the CLS token's twin
    keys[:, :, 2] = keys[:, :, 1]  # token 2 (A) is the distillation token's twin
    x, tokens = ToMe(depth=1, r=9, prefix_tokens=2, track_source=True).start(x)
    with pytest.warns(UserWarning, match="r=9 exceeds half the 10 unprotected tokens; merging 5"):
        out = tokens.reduce(x, 0, keys, None)
    assert out.shape == (2, 7, 6)
    assert (tokens.size[:, :2] == 1).all() and (tokens.source[:, 0, 0] == 1).all() and (tokens.source[:, 1, 1] == 1).all()
    with pytest.raises(ValueError, match="prefix_tokens must be at least 1"):
        ToMe(depth=1, prefix_tokens=0)


def test_tome_clips_r_with_warning():
    x = torch.randn(1, 7, 4)  # 6 unprotected tokens: at most 3 merge
    x, tokens = ToMe(depth=1, r=5).start(x)
    with pytest.warns(UserWarning, match="r=5 exceeds half the 6 unprotected tokens; merging 3"):
        out = tokens.reduce(x, 0, torch.randn(1, 2, 7, 4), None)
    assert out.shape == (1, 4, 4)


def test_proportional_attention_counts_a_token_of_size_two_twice():
    """softmax(qk + log size) v over a merged token of size 2 equals plain attention over two copies of it."""
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    method = ToMe(depth=1, r=0)
    _, tokens = method.start(torch.zeros(1, 5, 4))
    tokens.size = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [1.0]]])
    got, _ = tokens.attend(q, k, v, layer=0)
    dup = lambda t: torch.cat([t, t[:, :, 1:2]], dim=2)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(q, dup(k), dup(v))
    torch.testing.assert_close(got, want)


# --- EViT -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_rate", [0.0, -0.5, 1.5])
def test_evit_keep_rate_out_of_range(keep_rate):
    with pytest.raises(ValueError, match="keep_rate must be in"):
        EViT(depth=12, keep_rate=keep_rate)


def test_evit_default_layers():
    assert default_evit_layers(12) == [3, 6, 9]
    assert default_evit_layers(24) == [6, 12, 18]
    assert default_evit_layers(4) == [1, 2, 3]


@pytest.mark.parametrize("keep_rate", [0.5, 0.7, 1.0])
def test_evit_equals_reference(keep_rate):
    x = torch.randn(2, 11, 6)
    attention = torch.randn(2, 11).softmax(dim=-1)
    method = EViT(depth=1, keep_rate=keep_rate, layers=[0])
    x0, tokens = method.start(x)
    got = tokens.reduce(x0, 0, None, attention) if method.reduces_at(0) else x0
    torch.testing.assert_close(got, evit_reference(x, attention, keep_rate))


def test_evit_cls_attention_from_attend():
    q, k, v = torch.randn(3, 2, 3, 6, 4).unbind(0)
    _, tokens = EViT(depth=1, keep_rate=0.5, layers=[0]).start(torch.zeros(2, 6, 12))
    _, cls = tokens.attend(q, k, v, layer=0)
    want = ((q[:, :, :1] @ k.transpose(-1, -2)) / 2.0).softmax(dim=-1)[:, :, 0].mean(dim=1)
    torch.testing.assert_close(cls, want)


# --- DynamicViT -----------------------------------------------------------------------------------


def test_masked_softmax():
    logits = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(masked_softmax(logits, torch.ones(2, 5)), logits.softmax(dim=-1))
    keep = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]] * 2)
    probs = masked_softmax(logits, keep)
    assert (probs[:, :, [0, 1, 3]][..., [2, 4]] == 0).all()  # live queries never see dropped keys
    assert (probs[:, :, 2, 4] == 0).all() and (probs[:, :, 2, 2] > 0).all()  # a dropped query sees itself, not other dropped
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))


def test_dynamicvit_training_masks_and_loss_has_gradient():
    method = DynamicViT(depth=2, dim=8, keep_rate=0.5, layers=[0, 1]).train()
    x, tokens = method.start(torch.randn(3, 9, 8))
    for layer in range(2):
        x = tokens.reduce(x, layer, None, None)
    assert x.shape == (3, 9, 8) and tokens.keep.shape == (3, 9)
    assert (tokens.keep[:, 0] == 1).all() and set(tokens.keep.unique().tolist()) <= {0.0, 1.0}
    loss = method.aux_loss()
    assert loss.dim() == 0 and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in method.predictors.parameters())


def test_dynamicvit_inference_keeps_target_count_untrained():
    method = DynamicViT(depth=2, dim=8, keep_rate=0.5, layers=[0, 1]).eval()
    x = torch.randn(2, 17, 8)
    x0, tokens = method.start(x)
    out = tokens.reduce(tokens.reduce(x0, 0, None, None), 1, None, None)
    assert out.shape == (2, 1 + 4, 8) and tokens.keep is None and method.aux_loss() is None
    torch.testing.assert_close(out[:, 0], x[:, 0])


# --- patch dropout ----------------------------------------------------------------------------------


def test_patch_dropout_train_only():
    x = torch.randn(2, 11, 4)
    method = PatchDropout(keep_rate=0.5).train()
    out, _ = method.start(x)
    assert out.shape == (2, 6, 4) and torch.equal(out[:, 0], x[:, 0])
    assert all(any(torch.equal(row, xr) for xr in xb) for ob, xb in zip(out, x) for row in ob)
    assert method.eval().start(x)[0] is x
    with pytest.raises(ValueError, match="keep_rate"):
        PatchDropout(keep_rate=0.0)


@pytest.mark.parametrize("cls, extra", [(EViT, {}), (DynamicViT, {"dim": 8})])
def test_reduction_layers_outside_the_depth_are_refused(cls, extra):
    with pytest.raises(ValueError, match=r"layers must lie in \[0, 4\), got \[4\]"):
        cls(depth=4, layers=[1, 4], **extra)
    assert cls(depth=4, layers=[3, 1, 3], **extra).layers == [1, 3]


# --- ToMe fast paths: the merge matrix and log(size) in spare head dims ---------------------------


def test_tome_merge_gradient_equals_brute_force():
    x, metric = torch.randn(2, 13, 6, requires_grad=True), torch.randn(2, 13, 5)
    size = torch.randint(1, 4, (2, 13, 1)).float()
    weights = torch.randn(2, 13 - 4, 6)
    (naive_merge(x, metric, size, 4)[0] * weights).sum().backward()
    want, x.grad = x.grad, None
    (bipartite_soft_matching(metric, 4).merge_average(x, size)[0] * weights).sum().backward()
    torch.testing.assert_close(x.grad, want)


def test_tome_merge_in_bfloat16_matches_float32():
    """bf16 merge weights (size / merged size) round to 8 bits: error of the order of bf16's epsilon (2^-8)."""
    x, metric = torch.randn(2, 37, 16), torch.randn(2, 37, 8)
    size = torch.randint(1, 6, (2, 37, 1)).float()
    matching = bipartite_soft_matching(metric, 10)
    want, _ = matching.merge_average(x, size)
    got, got_size = matching.merge_average(x.bfloat16(), size.bfloat16())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert torch.equal(got_size.sum(dim=1).float(), size.sum(dim=1))  # small integers: exact in bf16


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_bias_in_spare_head_dims_equals_additive_mask(qkv_bias):
    """Tokens.project folds log(size) into 8 spare head dims of q and k; attention over them equals SDPA over
    the plain projections with log(size) as a mask, forward and backward (fp32: 1e-5)."""
    torch.manual_seed(0)
    num_heads, dim, n = 2, 16, 9
    qkv, proj = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias), torch.nn.Linear(dim, dim)
    x = torch.randn(3, n, dim, requires_grad=True)
    _, tokens = ToMe(depth=1, r=0).start(x.detach())
    tokens.size = torch.randint(1, 5, (3, n, 1)).float()

    def attention(folded: bool):
        if folded:
            q, k, v = tokens.project(qkv, x, num_heads, layer=0)
            assert q.shape[-1] == dim // num_heads + 8
        else:
            q, k, v = qkv(x).view(3, n, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = tokens.attend(q, k, v, layer=0)[0]
        return proj(y.transpose(1, 2).flatten(2))

    want = attention(folded=False)
    params = [x, qkv.weight, proj.weight]
    grads = torch.autograd.grad(want.square().sum(), params)
    got = attention(folded=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(got.square().sum(), params), grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_project_without_merged_tokens_is_the_plain_projection():
    qkv = torch.nn.Linear(8, 24)
    x = torch.randn(2, 5, 8)
    _, tokens = ToMe(depth=1, r=1).start(x)
    q, k, v = tokens.project(qkv, x, num_heads=2, layer=0)
    torch.testing.assert_close(torch.stack([q, k, v]), qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4))


@pytest.mark.parametrize("merged", [False, True], ids=["first-layer", "with-sizes"])
def test_project_computes_the_key_mean_in_its_gemm(merged):
    """ToMe's metric, the keys averaged over heads, comes out of the qkv GEMM: equal to averaging the keys
    (fp32: 1e-5), with and without the log(size) slots, and q, k, v unchanged."""
    torch.manual_seed(0)
    qkv, x = torch.nn.Linear(12, 36), torch.randn(2, 7, 12)
    _, tokens = ToMe(depth=1, r=2).start(x)
    if merged:
        tokens.size = torch.randint(1, 4, (2, 7, 1)).float()
    q, k, v = tokens.project(qkv, x, num_heads=3, layer=0)
    want_q, want_k, want_v = qkv(x).view(2, 7, 3, 3, 4).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(tokens.key_mean, want_k.mean(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k[..., :4], want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q[..., :4], want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, want_v, atol=1e-5, rtol=1e-5)


def test_fused_projection_is_cached_without_gradients_only():
    qkv, method = torch.nn.Linear(8, 24), ToMe(depth=1, r=1)
    with torch.no_grad():
        first = method.fused_projection(qkv, 2, bias_slots=True, key_mean=True)
        assert method.fused_projection(qkv, 2, bias_slots=True, key_mean=True)[0] is first[0]
        assert method.fused_projection(qkv, 2, bias_slots=False, key_mean=True)[0].shape == (2 * 8 + 8 + 4, 8)
        qkv.weight.add_(1.0)  # new weights: rebuilt
        rebuilt = method.fused_projection(qkv, 2, bias_slots=True, key_mean=True)
        assert rebuilt[0] is not first[0] and torch.allclose(rebuilt[0][-4:], qkv.weight[8:16].view(2, 4, 8).mean(0))
    grad_mode = method.fused_projection(qkv, 2, bias_slots=True, key_mean=True)
    assert grad_mode[0] is not rebuilt[0] and grad_mode[0].requires_grad  # built afresh inside the autograd graph


@pytest.mark.gpu
def test_tome_fast_paths_on_cuda_follow_the_float32_reference():
    """On CUDA in bf16: attention with log(size) in spare q/k dims (SDPA picks a fused kernel that takes v
    narrower than q, k) and the merge GEMM (197 tokens: 192 in the GEMM, 5 added after) stay within bf16
    error (2e-2 of the scale) of the float32 mask path and of the brute-force merge."""
    torch.manual_seed(0)
    dim, heads, n = 768, 12, 197
    qkv = torch.nn.Linear(dim, 3 * dim).cuda()
    x = torch.randn(4, n, dim, device="cuda")
    _, tokens = ToMe(depth=1, r=0).start(x)
    tokens.size = torch.randint(1, 6, (4, n, 1), device="cuda").float()
    q, k, v = qkv(x).view(4, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    want = tokens.attend(q, k, v, layer=0)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q, k, v = tokens.project(qkv, x, heads, layer=0)
        got = tokens.attend(q, k, v, layer=0)[0]
    assert q.shape[-1] == dim // heads + 8 and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 2e-2 * want.abs().max()
    metric, size = torch.randn(4, n, 64, device="cuda"), torch.randint(1, 4, (4, n, 1), device="cuda").float()
    want_x, _ = naive_merge(x[:1].cpu(), metric[:1].cpu(), size[:1].cpu(), 16)
    got_x, _ = bipartite_soft_matching(metric[:1], 16).merge_average(x[:1].bfloat16(), size[:1].bfloat16())
    assert (got_x.float().cpu() - want_x).abs().max() < 2e-2 * want_x.abs().max()
