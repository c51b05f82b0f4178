"""The GEMM patch embedding against timm's convolution (the reference): same outputs and gradients, same state dict,
clear errors for wrong image sizes. Tolerances: float32 1e-5 (observed ~1e-6); bfloat16 2e-2 of the float32
result (the same bf16 products, summed in another order)."""
from __future__ import annotations

import pytest
import torch
from timm.layers import PatchEmbed as TimmPatchEmbed

from layers import PatchEmbed


@pytest.mark.parametrize("img_size, patch, chans, dim", [(32, 4, 3, 64), (224, 16, 3, 48), (32, 2, 4, 24)])
def test_gemm_equals_the_convolution(img_size, patch, chans, dim):
    torch.manual_seed(0)
    ours = PatchEmbed(img_size, patch, chans, dim)
    conv = TimmPatchEmbed(img_size, patch, chans, dim)
    conv.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, chans, img_size, img_size, requires_grad=True)
    y, want = ours(x), conv(x)
    assert y.shape == (2, (img_size // patch) ** 2, dim)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, *ours.parameters()), g)
    expected = torch.autograd.grad(want, (x, *conv.parameters()), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    low = x.detach().bfloat16()
    err = (ours.bfloat16()(low).float() - conv.float()(low.float())).abs().max()
    assert err < 2e-2 * max(1.0, want.abs().max().item())


def test_wrong_image_size_is_a_clear_error():
    embed = PatchEmbed(32, 4, 3, 16)
    with pytest.raises(ValueError, match=r"images must be 32x32, got 28x32"):
        embed(torch.randn(1, 3, 28, 32))
    loose = PatchEmbed(32, 4, 3, 16, strict_img_size=False)
    with pytest.raises(ValueError, match="must be divisible by the patch size 4x4"):
        loose(torch.randn(1, 3, 30, 32))
    assert loose(torch.randn(1, 3, 36, 32)).shape == (1, 9 * 8, 16)


def test_other_layouts_run_timms_convolution():
    torch.manual_seed(0)
    ours = PatchEmbed(32, 4, 3, 16, flatten=False)
    conv = TimmPatchEmbed(32, 4, 3, 16, flatten=False)
    conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x), conv(x)) and ours(x).shape == (2, 16, 8, 8)


def test_leading_slots_hold_the_zero_patch_and_leave_the_patches_alone():
    """Rows written in passing for a CLS token hold the embedding of an all-zero patch (the bias); the patch
    rows are the usual output, bit for bit."""
    torch.manual_seed(0)
    embed = PatchEmbed(32, 4, 3, 16)
    x = torch.randn(2, 3, 32, 32)
    out = embed(x, leading_slots=2)
    assert out.shape == (2, 2 + 64, 16)
    torch.testing.assert_close(out[:, 2:], embed(x), atol=0, rtol=0)
    torch.testing.assert_close(out[:, :2], embed.proj.bias.expand(2, 2, -1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="leading_slots needs the flattened token output"):
        PatchEmbed(32, 4, 3, 16, flatten=False)(x, leading_slots=1)
