"""ToMe's Triton kernels (layers.token_reduction.tome_kernel): matching, merge, fused residual add and LayerNorm
against the torch path, on the CPU under Triton's interpreter and on CUDA; and the ViT taking them."""
from __future__ import annotations

import pytest
import torch

from layers.token_reduction import tome_kernel
from tome_kernel_checks import check_merge, check_ties
from triton_interpreter import needs_triton, run_interpreted
from zoo.registry import create_model


@needs_triton
def test_kernels_under_the_interpreter_match_the_torch_path():
    """float32 (rows equal to the torch path's) and float16, odd and even N down to 5, r from 1 to (N - 1) // 2 and
    over one block of merged tokens, with and without sizes, residual update and LayerNorm, with a distillation
    token and with registers protected; tie-breaking."""
    assert "17 interpreted checks passed" in run_interpreted("tome_kernel_checks.py")


def test_merge_checks_its_arguments():
    x, metric = torch.randn(2, 9, 8), torch.randn(2, 9, 4)
    with pytest.raises(ValueError, match=r"r must be in \[1, \(N - protected\) // 2 = 4\], got 5"):
        tome_kernel.merge(x, metric, None, 5)
    with pytest.raises(ValueError, match="metric must be"):
        tome_kernel.merge(x, metric[:, :8], None, 2)
    with pytest.raises(ValueError, match="size must be"):
        tome_kernel.merge(x, metric, torch.ones(2, 9), 2)
    with pytest.raises(ValueError, match="update must have x's shape"):
        tome_kernel.merge(x, metric, None, 2, update=x[:, :8])
    with pytest.raises(ValueError, match="norm must be a LayerNorm over the 8 channels"):
        tome_kernel.merge(x, metric, None, 2, norm=torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tome_kernel.merge(x.double(), metric, None, 2)


def test_only_cuda_inference_takes_the_kernels():
    x = torch.randn(2, 9, 8)
    assert not tome_kernel.supports(x, 2)  # CPU tensors take the torch path
    assert not tome_kernel.fuses_norm(x, torch.nn.LayerNorm(8).double())  # another dtype than x's
    assert not tome_kernel.fuses_norm(x, torch.nn.RMSNorm(8))
    with torch.no_grad():
        assert tome_kernel.fuses_norm(x, torch.nn.LayerNorm(8))
    assert not tome_kernel.fuses_norm(x, torch.nn.LayerNorm(8))  # its weights would get no gradient


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_on_cuda_match_the_torch_path(dtype):
    """ViT-B/16's sizes (197 tokens, 768 channels, 64-dim keys, r = 16), and the 512-token limit."""
    check_merge("cuda", dtype, 64, 197, 768, 64, 16)
    check_merge("cuda", dtype, 4, tome_kernel.MAX_TOKENS, 96, 64, 100, with_norm=False, seed=1)
    check_merge("cuda", dtype, 8, 37, 768, 64, 16, sized=False, with_update=False, seed=2)
    check_merge("cuda", dtype, 8, 198, 768, 64, 16, seed=3, protected=2)  # DeiT's CLS and distillation tokens
    check_ties("cuda")


@pytest.mark.gpu
def test_vit_with_tome_kernels_matches_the_torch_path(monkeypatch):
    """A ToMe ViT in inference on CUDA merges through the kernels (the add and LayerNorm fused) and gives the torch
    path's logits and token sources; in bf16 within bf16 error of float32; under autocast the norm stays outside;
    with gradients the torch path runs."""
    torch.manual_seed(0)
    model = create_model("vit-ti16", token_reduction={"name": "tome", "r": 8, "track_source": True}).cuda().eval()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    calls = []
    merge = tome_kernel.merge
    monkeypatch.setattr(tome_kernel, "merge", lambda *a, **kw: calls.append(kw["norm"] is not None) or merge(*a, **kw))
    with torch.inference_mode():
        fused = model(images)
        fused_source = model.token_reduction.last_tokens.source
        assert calls == [True] * 12
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = model(images)
        assert calls[12:] == [False] * 12  # autocast would run the norm in float32: it stays outside the kernel
        monkeypatch.setattr(tome_kernel, "supports", lambda *a: False)
        reference = model(images)
        assert torch.equal(model.token_reduction.last_tokens.source, fused_source)
        monkeypatch.undo()
        bf16 = model.to(torch.bfloat16)(images.bfloat16())
    scale = reference.abs().max()
    assert (fused - reference).abs().max() <= 1e-4 * scale
    assert (autocast.float() - reference).abs().max() <= 5e-2 * scale
    assert (bf16.float() - reference).abs().max() <= 5e-2 * scale
    model.float().train()
    x = torch.randn(2, 197, 192, device="cuda")
    assert tome_kernel.supports(x, 8) and not tome_kernel.supports(x, 8, update=x.clone().requires_grad_())
    assert not tome_kernel.supports(x.requires_grad_(), 8)
    model(images).sum().backward()  # the torch path, differentiable
    assert model.blocks[0].mixer.qkv.weight.grad is not None
