"""Mixture-of-experts layer: every router x implementation against a per-token reference, capacity,
balancing, losses and argument checks.

Tolerances (max absolute error, scaled by ``max(1, max|expected|)``):
* float32: 1e-5 for outputs and gradients (observed <= 3e-7).
* bfloat16: 2e-2 against the float32 reference built from the same bf16-rounded weights and inputs
  (the same routing: both take the logits of the bf16 router GEMM), and grouped vs loop in bf16
  (observed: outputs ~2e-3, gradients <= 1.1e-2, i.e. a few bf16 ulps).
grouped_mm runs on CPU in torch 2.14 (torch's per-group fallback), so it is tested here; the
``gpu`` test runs the CUDA path (bf16 fused kernel on sm90+) against the loop.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from layers.moe import GROUPED_MM, MoE, count_params, grouped_mm_unsupported, list_moe_routers

FP32_TOL, BF16_TOL = 1e-5, 2e-2
DIM, HIDDEN, EXPERTS, TOKENS = 16, 32, 4, 12
ROUTER_TOP_K = {"softmax_topk": 2, "sigmoid_topk": 2, "switch": 1, "expert_choice": 2}
IMPLEMENTATIONS = ["loop", "grouped_mm"] if GROUPED_MM is not None else ["loop"]


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / max(1.0, expected.float().abs().max().item())).item()


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """For each token, sum ``weight * expert(x)`` over its kept assignments, one token at a time, in fp32."""
    tokens = x.reshape(-1, moe.dim)
    routing = moe.route(tokens)
    w_in, w_out = moe.experts.w_in.float(), moe.experts.w_out.float()
    shared = copy.deepcopy(moe.shared).float() if moe.shared is not None else None
    out = []
    for t in range(tokens.shape[0]):
        y = torch.zeros(moe.dim)
        for a in torch.nonzero((routing.token == t) & routing.kept).flatten().tolist():
            e = routing.expert[a].item()
            h = tokens[t].float() @ w_in[e]
            h = F.silu(h[:moe.hidden]) * h[moe.hidden:] if moe.experts.spec.width == 2 else F.gelu(h)
            y = y + routing.weight[a] * (h @ w_out[e])
        if shared is not None:
            y = y + shared(tokens[t].float())
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def make(router: str = "softmax_topk", **kw) -> MoE:
    kw.setdefault("top_k", ROUTER_TOP_K[router])
    return MoE(DIM, HIDDEN, EXPERTS, router=router, **kw)


def grads(moe: MoE, x: torch.Tensor, g: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    moe.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (y.float() * g).sum().backward()
    return y.detach(), [x.grad, moe.router.weight.grad, moe.experts.w_in.grad, moe.experts.w_out.grad]


# --- matches the per-token reference -------------------------------------------------------------

CASES = [(r, None) for r in ROUTER_TOP_K] + [("softmax_topk", 0.5), ("sigmoid_topk", 0.75)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("router,capacity_factor", CASES)
def test_matches_naive_fp32(router, capacity_factor, implementation):
    moe = make(router, capacity_factor=capacity_factor, implementation=implementation, shared_experts=1)
    x, g = torch.randn(3, 4, DIM), torch.randn(3, 4, DIM)
    y, got = grads(moe, x, g, lambda x: moe(x)[0])
    y_ref, want = grads(moe, x, g, lambda x: naive_moe(moe, x))
    assert max_err(y, y_ref) < FP32_TOL
    for a, b in zip(got, want):
        assert max_err(a, b) < FP32_TOL
    if capacity_factor is not None and router != "expert_choice":
        assert moe(x)[1].dropped_fraction > 0  # the capacity cases really drop something


@pytest.mark.parametrize("expert", ["swiglu", "gelu"])
def test_grouped_equals_loop_fp32(expert):
    if GROUPED_MM is None:
        pytest.skip("torch has no grouped_mm")
    grouped = make(expert=expert, implementation="grouped_mm", shared_experts=2)
    loop = make(expert=expert, implementation="loop", shared_experts=2)
    loop.load_state_dict(grouped.state_dict())
    x, g = torch.randn(TOKENS, DIM), torch.randn(TOKENS, DIM)
    y_grouped, g_grouped = grads(grouped, x, g, lambda x: grouped(x)[0])
    y_loop, g_loop = grads(loop, x, g, lambda x: loop(x)[0])
    assert max_err(y_grouped, y_loop) < FP32_TOL and max_err(y_loop, naive_moe(loop, x)) < FP32_TOL
    for a, b in zip(g_grouped, g_loop):
        assert max_err(a, b) < FP32_TOL


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("router", list(ROUTER_TOP_K))
def test_bf16_matches_fp32_reference(router, implementation):
    """bf16 forward and gradients against the fp32 per-token reference on the same bf16 weights."""
    moe = make(router, implementation=implementation, capacity_factor=0.75 if router == "softmax_topk" else None)
    moe = moe.to(torch.bfloat16)
    x, g = torch.randn(TOKENS, DIM).to(torch.bfloat16), torch.randn(TOKENS, DIM)
    y, got = grads(moe, x, g, lambda x: moe(x)[0])
    y_ref, want = grads(moe, x, g, lambda x: naive_moe(moe, x))
    assert y.dtype == torch.bfloat16 and max_err(y, y_ref) < BF16_TOL
    for a, b in zip(got, want):
        assert max_err(a, b) < BF16_TOL
    loop = make(router, implementation="loop", capacity_factor=moe.capacity_factor).to(torch.bfloat16)
    loop.load_state_dict(moe.state_dict())
    assert max_err(y, loop(x)[0]) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("router", list(ROUTER_TOP_K))
def test_grouped_cuda_bf16_matches_loop(router):
    moe = make(router, implementation="grouped_mm").cuda().to(torch.bfloat16)
    loop = make(router, implementation="loop").cuda().to(torch.bfloat16)
    loop.load_state_dict(moe.state_dict())
    x, g = torch.randn(4, 64, DIM, device="cuda").to(torch.bfloat16), torch.randn(4, 64, DIM, device="cuda")
    y, got = grads(moe, x, g, lambda x: moe(x)[0])
    y_loop, want = grads(loop, x, g, lambda x: loop(x)[0])
    assert max_err(y, y_loop) < BF16_TOL
    for a, b in zip(got, want):
        assert max_err(a, b) < BF16_TOL


# --- routers ---------------------------------------------------------------------------------------


def test_router_weights_by_hand():
    x = torch.randn(TOKENS, DIM)
    for router, k in ROUTER_TOP_K.items():
        moe = make(router)
        r = moe.route(x)
        logits = x @ moe.router.weight.t()
        assert torch.allclose(r.logits, logits, atol=1e-6)
        if router == "expert_choice":
            probs = logits.softmax(-1)
            c = math.ceil(TOKENS * k / EXPERTS)
            for e in range(EXPERTS):
                mine = r.token[r.expert == e]
                assert set(mine.tolist()) == set(probs[:, e].topk(c).indices.tolist())
                assert torch.allclose(r.weight[r.expert == e], probs[mine, e])
            continue
        scores = logits.sigmoid() if router == "sigmoid_topk" else logits.softmax(-1)
        top = scores.topk(k, dim=-1)
        weight = top.values / top.values.sum(-1, keepdim=True) if router != "switch" else top.values
        assert torch.equal(r.expert.view(TOKENS, k), top.indices)
        assert torch.equal(r.token.view(TOKENS, k), torch.arange(TOKENS)[:, None].expand(TOKENS, k))
        assert torch.allclose(r.weight.view(TOKENS, k), weight, atol=1e-6)


def test_capacity_drops_known_tokens_and_shared_still_applies():
    """Expert 0 gets tokens 0, 1, 3, 4 (x[:, 0] > 0), capacity ceil(1.0 * 6 / 2) = 3, so token 4 drops."""
    for implementation in IMPLEMENTATIONS:
        moe = MoE(DIM, HIDDEN, 2, top_k=1, capacity_factor=1.0, shared_experts=1, implementation=implementation)
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[0, 0], moe.router.weight[1, 0] = 10.0, -10.0
        x = torch.randn(6, DIM)
        x[:, 0] = torch.tensor([1.0, 2.0, -1.0, 0.5, 1.5, -2.0])
        y, aux = moe(x)
        assert torch.equal(moe.route(x).kept, torch.tensor([True, True, True, True, False, True]))
        assert aux.dropped_fraction.item() == pytest.approx(1 / 6)
        assert torch.equal(aux.load, torch.tensor([4 / 6, 2 / 6]))
        shared = moe.shared(x)
        assert torch.equal(y[4], shared[4])  # routed part exactly 0; the shared expert still runs
        assert (y[[0, 1, 2, 3, 5]] - shared[[0, 1, 2, 3, 5]]).abs().min() > 0


@pytest.mark.parametrize("router, capacity_factor, drops", [("softmax_topk", None, False), ("softmax_topk", 1.0, True),
                                                             ("switch", None, True), ("expert_choice", None, False)])
def test_only_capacity_limited_token_choice_drops(router, capacity_factor, drops):
    """``Routing.drops`` (which lets the grouped path skip the drop masks) holds exactly for token choice with a
    capacity (switch's default 1.25 included); otherwise every assignment is kept and nothing is reported dropped."""
    moe = make(router, capacity_factor=capacity_factor)
    x = torch.randn(TOKENS, DIM) + torch.randn(DIM)  # skewed, so a capacity would bite
    routing = moe.route(x)
    assert routing.drops is drops
    if not drops:
        assert routing.kept.all() and moe(x)[1].dropped_fraction == 0


def test_capacity_keeps_first_assignments_in_token_order():
    moe = make(top_k=2, capacity_factor=0.6)
    r = moe.route(torch.randn(TOKENS, DIM))
    capacity, seen, kept = moe.capacity(TOKENS), [0] * EXPERTS, []
    for e in r.expert.tolist():  # token-major: token 0's choices, then token 1's, ...
        kept.append(seen[e] < capacity)
        seen[e] += 1
    assert capacity == math.ceil(0.6 * TOKENS * 2 / EXPERTS)
    assert r.kept.tolist() == kept and not all(kept)


def test_expert_choice_load_exactly_balanced():
    moe = make("expert_choice", capacity_factor=1.5)
    x = torch.randn(2, 10, DIM) + torch.randn(DIM)  # a shared offset skews token-choice routing
    _, aux = moe(x)
    counts = torch.bincount(moe.route(x.reshape(-1, DIM)).expert, minlength=EXPERTS)
    assert torch.equal(counts, torch.full((EXPERTS,), math.ceil(1.5 * 20 * 2 / EXPERTS)))
    assert torch.equal(aux.load, torch.full((EXPERTS,), 1 / EXPERTS)) and aux.dropped_fraction == 0


# --- balancing and losses --------------------------------------------------------------------------


def test_bias_balancing_evens_out_skewed_router():
    moe = make(balance="bias", bias_update_rate=0.01, implementation="loop")
    with torch.no_grad():
        moe.router.weight[0] += 0.1  # x has mean +1: expert 0 wins most tokens
    x = torch.randn(256, DIM) + 1.0

    def ratio(load):
        return (load.max() / load.min().clamp(min=1e-3)).item()

    moe.eval()
    before = moe(x)[1].load
    assert torch.equal(moe.expert_bias, torch.zeros(EXPERTS))  # eval mode never updates the bias
    moe.train()
    with torch.no_grad():
        for _ in range(50):
            moe(x)
    after = moe.eval()(x)[1].load
    assert ratio(before) > 4 and ratio(after) < 1.5, (before, after)  # observed 24 -> 1.18 (seed 0)
    assert moe.expert_bias.argmin() == 0  # the overloaded expert is pushed down most
    assert moe.to(torch.bfloat16).expert_bias.dtype == torch.float32  # 1e-2 steps would round away in bf16
    # the bias picks experts but never enters the combine weights
    r = moe.route(x)
    probs = r.probs.gather(-1, r.expert.view(-1, 2))
    assert torch.allclose(r.weight.view(-1, 2), probs / probs.sum(-1, keepdim=True))


def test_aux_and_z_loss_by_hand():
    moe = make(aux_loss_weight=0.1, z_loss=1e-3)
    x = torch.randn(TOKENS, DIM)
    _, aux = moe(x)
    logits = (x @ moe.router.weight.t()).double()
    probs = logits.softmax(-1)
    f = torch.zeros(EXPERTS, dtype=torch.double)
    for row in probs.topk(2, dim=-1).indices.tolist():
        for e in row:
            f[e] += 1 / (TOKENS * 2)
    balance = 0.1 * EXPERTS * sum(f[i] * probs[:, i].mean() for i in range(EXPERTS))
    z = 1e-3 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / TOKENS
    assert aux.balance_loss.item() == pytest.approx(balance.item(), rel=1e-5)
    assert aux.z_loss.item() == pytest.approx(z, rel=1e-5)
    assert aux.loss.item() == pytest.approx(balance.item() + z, rel=1e-5)
    assert torch.allclose(aux.load, f.float())
    aux.loss.backward()
    assert moe.router.weight.grad.abs().max() > 0 and not aux.load.requires_grad


def test_no_balance_and_no_z_give_zero_losses():
    _, aux = make(balance="none")(torch.randn(TOKENS, DIM))
    assert aux.loss.item() == 0 and aux.balance_loss.item() == 0 and aux.z_loss.item() == 0


def test_jitter_only_in_training():
    moe = make(jitter=0.1)
    x = torch.randn(TOKENS, DIM)
    assert not torch.equal(moe.route(x).logits, moe.route(x).logits)
    moe.eval()
    assert torch.equal(moe.route(x).logits, x @ moe.router.weight.t())


# --- parameters, fallbacks, bad input -------------------------------------------------------------


def test_param_counts():
    moe = make(top_k=2, shared_experts=2)
    router, expert, shared = DIM * EXPERTS, 3 * DIM * HIDDEN, 3 * DIM * 2 * HIDDEN
    assert count_params(moe) == (router + EXPERTS * expert + shared, router + 2 * expert + shared)
    assert make("switch", expert="gelu").active_params == DIM * EXPERTS + 2 * DIM * HIDDEN


def test_auto_falls_back_where_grouped_mm_cannot_run():
    """dim 6 is not a 16-byte row in fp32, and float64 is not a grouped_mm dtype: auto runs the loop."""
    if GROUPED_MM is not None:  # torch 2.14 runs grouped_mm on CPU, so aligned fp32 takes the grouped path
        assert grouped_mm_unsupported(torch.randn(TOKENS, DIM), make().experts) is None
    x = torch.randn(TOKENS, 6)
    auto = MoE(6, HIDDEN, EXPERTS, top_k=2)
    y, _ = auto(x)
    assert max_err(y, naive_moe(auto, x)) < FP32_TOL
    auto64 = make().double()
    assert max_err(auto64(x64 := torch.randn(TOKENS, DIM, dtype=torch.float64))[0], naive_moe(auto64, x64)) < FP32_TOL
    if GROUPED_MM is not None:
        with pytest.raises(ValueError, match="implementation='grouped_mm'.*multiple of 4"):
            MoE(6, HIDDEN, EXPERTS, top_k=2, implementation="grouped_mm")(x)
        with pytest.raises(ValueError, match="implementation='grouped_mm'.*float64"):
            make(implementation="grouped_mm").double()(x64)


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 5}, "top_k"), ({"top_k": 0}, "top_k"), ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -1.0}, "capacity_factor"), ({"router": "switch", "top_k": 2}, "top_k"),
    ({"router": "expert_choice", "causal": True}, "future"),
    ({"router": "softmax"}, "expert_choice, sigmoid_topk, softmax_topk, switch"),
    ({"balance": "auxx"}, "Valid: aux, bias, none"), ({"expert": "swish"}, "Valid: gelu, swiglu"),
    ({"implementation": "grouped"}, "Valid: auto, grouped_mm, loop"),
])
def test_bad_arguments(kwargs, match):
    kwargs = {"top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MoE(DIM, HIDDEN, EXPERTS, **kwargs)


def test_wrong_last_dim():
    with pytest.raises(ValueError, match="last dimension 16"):
        make()(torch.randn(2, 3, DIM + 1))


def test_causal_token_choice_allowed():
    assert set(list_moe_routers()) == set(ROUTER_TOP_K)
    for router in ("softmax_topk", "sigmoid_topk", "switch"):
        make(router, causal=True)


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
def test_autocast_router_gemm_in_bfloat16_and_routing_math_in_float32(implementation):
    """Under bf16 autocast the router's logits come from a bf16 GEMM (float32 out, as an nn.Linear under autocast
    would give) and the softmax, top-k and weights are float32; the experts run in bf16; the output is within bf16
    tolerance (3e-2) of the float32 layer."""
    torch.manual_seed(0)
    m = MoE(64, 64, 8, 2, implementation=implementation)
    x = torch.randn(48, 64, requires_grad=True)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, aux16 = m(x)
    routing = m.route(x.detach().to(torch.bfloat16))
    expected_logits = F.linear(x.detach().to(torch.bfloat16), m.router.weight.detach().to(torch.bfloat16)).float()
    assert routing.logits.dtype == torch.float32 and torch.equal(routing.logits, expected_logits)
    assert routing.weight.dtype == torch.float32 and routing.probs.dtype == torch.float32
    assert torch.equal(aux16.load, routing.counts.float() / routing.expert.numel())
    assert aux16.loss.dtype == torch.float32
    err = (y16.float() - y32).abs().max() / y32.abs().max().clamp(min=1)
    assert err < 3e-2
    y16.float().sum().backward()
    assert m.experts.w_in.grad is not None and m.experts.w_in.grad.dtype == torch.float32


def test_expert_rank_and_counts_by_hand():
    from layers.moe import expert_rank

    expert = torch.randint(0, 5, (40,))
    expert[expert == 3] = 1  # expert 3 gets nothing
    rank, counts = expert_rank(expert, 5)
    seen = [0] * 5
    for a, e in enumerate(expert.tolist()):
        assert rank[a] == seen[e]
        seen[e] += 1
    assert counts.tolist() == seen and seen[3] == 0
