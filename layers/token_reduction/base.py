"""The shared machinery of token reduction: the method base class, its registry, and ``Tokens``, the
per-forward record (token sizes, sources, soft keep mask) that attention and the methods read.

A ViT block with a reduction method computes its attention through :meth:`Tokens.attend` (so it can
add ``log(size)`` to the logits, mask dropped tokens, and hand the CLS attention row to the method),
then calls :meth:`Tokens.reduce` between the attention and the MLP. Blocks where nothing is reduced
and no token carries a size or mask run their stock attention, so a method that reduces nothing
(ToMe ``r=0``, EViT ``keep_rate=1``) leaves the model's output bit-identical.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from layers.registry import Registry, check_kwargs, signature_kwargs

TOKEN_REDUCTIONS = Registry("token reduction")

# filled in by the model, never by the spec
MODEL_ARGUMENTS = ("depth", "dim", "prefix_tokens")
# spare head dims that carry proportional attention's log(size) (a multiple of 8, as flash kernels need)
BIAS_SLOTS = 8


def register_token_reduction(name: str):
    """Class decorator: ``@register_token_reduction("tome") class ToMe(TokenReduction): ...``."""

    def decorator(cls):
        TOKEN_REDUCTIONS.register(name, cls)
        cls.reduction_name = name
        return cls

    return decorator


def list_token_reductions(pattern: str = "*") -> list[str]:
    return TOKEN_REDUCTIONS.names(pattern)


def get_token_reduction_class(name: str) -> type["TokenReduction"]:
    return TOKEN_REDUCTIONS.get(name)


def create_token_reduction(spec: Mapping[str, Any], depth: int, dim: int, prefix_tokens: int = 1) -> "TokenReduction":
    """Build a method from a spec ``{name: ..., **options}``; ``depth``, ``dim`` and ``prefix_tokens`` (the CLS
    token, plus any distillation or register tokens, first in the sequence) come from the model. An unknown name
    or option raises an error naming it (with close matches); so does a model with more prefix tokens than the
    method can protect (only methods taking ``prefix_tokens`` protect more than the CLS token)."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"token_reduction must be a mapping with a 'name' key, got {spec!r}")
    options = {k: v for k, v in spec.items() if k != "name"}
    cls = get_token_reduction_class(spec["name"])
    accepted = signature_kwargs(cls.__init__)
    given_model_args = [k for k in MODEL_ARGUMENTS if k in options]
    if given_model_args:
        raise TypeError(f"token_reduction {spec['name']!r}: {', '.join(given_model_args)} is set by the model, not the spec")
    check_kwargs(f"token_reduction {spec['name']!r}", options, [a for a in accepted if a not in ("self", *MODEL_ARGUMENTS)])
    if prefix_tokens != 1 and "prefix_tokens" not in accepted:
        raise ValueError(f"token_reduction {spec['name']!r} protects only the CLS token; this model has {prefix_tokens} "
                         f"prefix tokens (CLS, distillation or register tokens): use tome")
    context = {"depth": depth, "dim": dim, "prefix_tokens": prefix_tokens}
    return cls(**{k: v for k, v in context.items() if k in accepted}, **options)


def check_fraction(name: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]`` for x [B, N, C] and index [B, M] -> [B, M, C]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over keys restricted to kept tokens (DynamicViT's attention masking).

    ``keep`` [B, N] is a (possibly straight-through) 0/1 mask; multiplying the exponentials by it keeps
    the mask differentiable. Every query also sees itself, so a dropped query's row stays finite.
    """
    n = logits.shape[-1]
    eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
    allowed = keep[:, None, None, :] + (1 - keep[:, None, None, :]) * eye  # [B, 1, N, N]
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * allowed
    return weights / weights.sum(dim=-1, keepdim=True)


class Tokens:
    """What one forward knows about its tokens beyond their features (token 0 is the CLS token).

    ``size`` [B, N, 1]: how many original tokens each token stands for (None: all 1).
    ``source`` [B, N, N0]: which original tokens each token holds (None unless tracked).
    ``keep`` [B, N]: DynamicViT's soft decisions while training (None: every token is live).
    ``proportional``: add ``log(size)`` to attention logits (ToMe's proportional attention).
    """

    def __init__(self, method: "TokenReduction", x: torch.Tensor, track_source: bool = False, proportional: bool = False):
        self.method = method
        self.num_tokens = x.shape[1]
        self.size: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.proportional = proportional
        self.key_mean: torch.Tensor | None = None  # the keys averaged over heads, when :meth:`project` computed them
        self.source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1) if track_source else None

    def intercepts(self, layer: int) -> bool:
        """Whether block ``layer`` must compute its attention through :meth:`attend`."""
        return self.method.reduces_at(layer) or self.keep is not None or (self.proportional and self.size is not None)

    def attention_bias(self) -> torch.Tensor | None:
        """``log(size)`` per key, [B, 1, 1, N], when proportional attention is on and tokens were merged."""
        if not self.proportional or self.size is None:
            return None
        return self.size.log().transpose(1, 2)[:, None]

    def project(self, qkv: nn.Linear, x: torch.Tensor, num_heads: int, layer: int):
        """q, k, v [B, H, N, D'|D] of block ``layer``'s fused ``qkv`` projection of ``x`` [B, N, C], for :meth:`attend`.

        Under proportional attention with merged tokens, log(size) rides in ``BIAS_SLOTS`` spare head
        dims of q and k (D' = D + 8; q holds 1, k holds log(size) sqrt(D)), so q k^T / sqrt(D) already
        carries the bias and SDPA keeps its fused kernels (cuDNN, which takes a wider q and k than v),
        which are several times slower with an additive mask. Padding the weights costs far less than
        concatenating the slots to q and k. Otherwise D' = D. When the method reduces here by the keys
        averaged over heads (ToMe), that average comes out of the same GEMM (the head-averaged key
        weights are a linear map too), cheaper than reducing the strided keys afterwards."""
        B, N, _ = x.shape
        head_dim = qkv.out_features // (3 * num_heads)
        bias = self.attention_bias()
        wants_key_mean = self.method.needs_key_mean and self.method.reduces_at(layer)
        self.key_mean = None
        if bias is None and not wants_key_mean:
            return qkv(x).view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weight, fused_bias = self.method.fused_projection(qkv, num_heads, bias is not None, wants_key_mean)
        out = F.linear(x, weight, fused_bias)
        width = head_dim + (BIAS_SLOTS if bias is not None else 0)
        qk = out[..., : 2 * num_heads * width].view(B, N, 2, num_heads, width)
        if bias is not None:
            qk[:, :, 1, :, head_dim] = bias.view(B, N, 1) * math.sqrt(head_dim)  # the key slot
        v = out[..., 2 * num_heads * width: 2 * num_heads * width + num_heads * head_dim].view(B, N, num_heads, head_dim)
        if wants_key_mean:
            self.key_mean = out[..., -head_dim:]
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, dropout_p: float = 0.0):
        """softmax(q k^T / sqrt(D) + log(size)) v over live tokens, D = v's head dim; q, k, v [B, H, N, .] from
        :meth:`project`: when q and k are wider than v the bias is already in q k^T, otherwise it is added as
        a mask.

        Returns (output [B, H, N, D], CLS attention [B, N] averaged over heads, or None when the
        method at ``layer`` does not need it)."""
        head_dim = v.shape[-1]
        bias = self.attention_bias() if q.shape[-1] == head_dim else None
        need_cls = self.method.needs_cls_attention and self.method.reduces_at(layer)
        scale = 1.0 / math.sqrt(head_dim)
        if self.keep is not None:  # DynamicViT training: explicit masked softmax (differentiable in keep)
            logits = (q @ k.transpose(-1, -2)) * scale
            logits = logits if bias is None else logits + bias
            probs = F.dropout(masked_softmax(logits, self.keep), dropout_p)
            return probs @ v, probs[:, :, 0].mean(dim=1) if need_cls else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        if not need_cls:
            return out, None
        cls_logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale  # [B, H, 1, N]
        cls_logits = cls_logits if bias is None else cls_logits + bias
        return out, cls_logits.softmax(dim=-1)[:, :, 0].mean(dim=1)

    def reduce(self, x: torch.Tensor, layer: int, keys: torch.Tensor, cls_attention: torch.Tensor | None) -> torch.Tensor:
        """Apply the method at ``layer`` (between attention and MLP); ``keys`` [B, H, N, D]."""
        return self.reduce_residual(x, None, None, layer, keys, cls_attention)[0]

    def reduce_residual(self, x: torch.Tensor, update: torch.Tensor | None, norm: nn.Module | None, layer: int,
                        keys: torch.Tensor, cls_attention: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual stream after a block's attention: ``x + update`` [B, N, C] reduced at ``layer``, and
        ``norm`` of it (the MLP's input; None without a norm). A method may fuse the three (ToMe on CUDA)."""
        if not self.method.reduces_at(layer):
            x = x if update is None else x + update
            return x, None if norm is None else norm(x)
        key_mean = None
        if self.method.needs_key_mean:
            key_mean = self.key_mean if self.key_mean is not None else keys.mean(dim=1)
        self.key_mean = None
        return self.method.reduce_residual(x, update, norm, self, layer, key_mean, cls_attention)

    def select(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Keep tokens ``index`` [B, M] of ``x`` and of every per-token record."""
        if self.size is not None:
            self.size = gather_tokens(self.size, index)
        if self.source is not None:
            self.source = gather_tokens(self.source, index)
        return gather_tokens(x, index)


class TokenReduction(nn.Module):
    """A way of shrinking (or masking) the token set of a ViT at some layers.

    Subclasses define :meth:`reduces_at` and :meth:`reduce`; :meth:`prepare` may act once on the
    embedded tokens. ``last_tokens`` holds the :class:`Tokens` record of the last forward (sizes and
    sources for visualisation)."""

    reduction_name: str
    needs_cls_attention = False
    needs_key_mean = False
    proportional_attention = False
    track_source = False

    def __init__(self):
        super().__init__()
        self.last_tokens: Tokens | None = None
        self._projections: dict = {}  # fused_projection's inference cache

    def fused_projection(self, qkv: nn.Linear, num_heads: int, bias_slots: bool, key_mean: bool):
        """Weight and bias of the widened qkv projection behind :meth:`Tokens.project`: q and k with
        ``BIAS_SLOTS`` spare dims per head (the query slot's bias 1), then v, then the head-averaged key
        weights. Without gradients (inference) they are built once per projection and kept while its
        weights stay the same tensors at the same version (a copy of the qkv weights per block)."""
        stamp = (qkv.weight.data_ptr(), qkv.weight._version, qkv.weight.dtype,
                 None if qkv.bias is None else (qkv.bias.data_ptr(), qkv.bias._version))
        key = (id(qkv), bias_slots, key_mean, torch.is_inference_mode_enabled())
        cacheable = not torch.is_grad_enabled()
        if cacheable and key in self._projections and self._projections[key][0] == stamp:
            return self._projections[key][1]
        head_dim = qkv.out_features // (3 * num_heads)
        weight = qkv.weight.view(3, num_heads, head_dim, -1)
        bias = qkv.bias.view(3, num_heads, head_dim) if qkv.bias is not None else weight.new_zeros(3, num_heads, head_dim)
        qk_weight, qk_bias = weight[:2], bias[:2]
        if bias_slots:
            qk_weight, qk_bias = F.pad(qk_weight, (0, 0, 0, BIAS_SLOTS)), F.pad(qk_bias, (0, BIAS_SLOTS))
            qk_bias[0, :, head_dim] = 1.0  # the query slot
        weights, biases = [qk_weight.flatten(0, 2), weight[2].flatten(0, 1)], [qk_bias.flatten(), bias[2].flatten()]
        if key_mean:
            weights.append(weight[1].mean(dim=0))
            biases.append(bias[1].mean(dim=0))
        fused = torch.cat(weights), torch.cat(biases)
        if cacheable:
            self._projections[key] = (stamp, fused)
        return fused

    def start(self, x: torch.Tensor) -> tuple[torch.Tensor, Tokens]:
        """Open a forward: the record of ``x`` [B, N, C] (CLS first) and ``x`` after :meth:`prepare`."""
        tokens = Tokens(self, x, track_source=self.track_source, proportional=self.proportional_attention)
        self.last_tokens = tokens
        return self.prepare(x, tokens), tokens

    def prepare(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        return x

    def reduces_at(self, layer: int) -> bool:
        return False

    def reduce(self, x: torch.Tensor, tokens: Tokens, layer: int, key_mean: torch.Tensor | None,
               cls_attention: torch.Tensor | None) -> torch.Tensor:
        """``key_mean`` [B, N, D]: the keys averaged over heads (when ``needs_key_mean``); ``cls_attention``
        [B, N]: the CLS token's attention averaged over heads (when ``needs_cls_attention``)."""
        return x

    def reduce_residual(self, x: torch.Tensor, update: torch.Tensor | None, norm: nn.Module | None, tokens: Tokens,
                        layer: int, key_mean: torch.Tensor | None, cls_attention: torch.Tensor | None):
        """``(reduce(x + update), norm of it)`` (see :meth:`Tokens.reduce_residual`); methods with a fused
        kernel override it."""
        x = self.reduce(x if update is None else x + update, tokens, layer, key_mean, cls_attention)
        return x, None if norm is None else norm(x)

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary training loss of the last forward (DynamicViT's keep-ratio loss), else None."""
        return None
