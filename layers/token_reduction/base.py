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
MODEL_ARGUMENTS = ("depth", "dim")


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


def create_token_reduction(spec: Mapping[str, Any], depth: int, dim: int) -> "TokenReduction":
    """Build a method from a spec ``{name: ..., **options}``; ``depth`` and ``dim`` come from the model.
    An unknown name or option raises an error naming it (with close matches)."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"token_reduction must be a mapping with a 'name' key, got {spec!r}")
    options = {k: v for k, v in spec.items() if k != "name"}
    cls = get_token_reduction_class(spec["name"])
    accepted = signature_kwargs(cls.__init__)
    given_model_args = [k for k in MODEL_ARGUMENTS if k in options]
    if given_model_args:
        raise TypeError(f"token_reduction {spec['name']!r}: {', '.join(given_model_args)} is set by the model, not the spec")
    check_kwargs(f"token_reduction {spec['name']!r}", options, [a for a in accepted if a not in ("self", *MODEL_ARGUMENTS)])
    context = {"depth": depth, "dim": dim}
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
        self.source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1) if track_source else None

    def intercepts(self, layer: int) -> bool:
        """Whether block ``layer`` must compute its attention through :meth:`attend`."""
        return self.method.reduces_at(layer) or self.keep is not None or (self.proportional and self.size is not None)

    def attention_bias(self) -> torch.Tensor | None:
        """``log(size)`` per key, [B, 1, 1, N], when proportional attention is on and tokens were merged."""
        if not self.proportional or self.size is None:
            return None
        return self.size.log().transpose(1, 2)[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, dropout_p: float = 0.0):
        """softmax(q k^T / sqrt(d) + log(size)) v over live tokens; q, k, v [B, H, N, D].

        Returns (output [B, H, N, D], CLS attention [B, N] averaged over heads, or None when the
        method at ``layer`` does not need it)."""
        bias = self.attention_bias()
        need_cls = self.method.needs_cls_attention and self.method.reduces_at(layer)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.keep is not None:  # DynamicViT training: explicit masked softmax (differentiable in keep)
            logits = (q @ k.transpose(-1, -2)) * scale
            logits = logits if bias is None else logits + bias
            probs = F.dropout(masked_softmax(logits, self.keep), dropout_p)
            return probs @ v, probs[:, :, 0].mean(dim=1) if need_cls else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        if not need_cls:
            return out, None
        cls_logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale  # [B, H, 1, N]
        cls_logits = cls_logits if bias is None else cls_logits + bias
        return out, cls_logits.softmax(dim=-1)[:, :, 0].mean(dim=1)

    def reduce(self, x: torch.Tensor, layer: int, keys: torch.Tensor, cls_attention: torch.Tensor | None) -> torch.Tensor:
        """Apply the method at ``layer`` (between attention and MLP); ``keys`` [B, H, N, D]."""
        if not self.method.reduces_at(layer):
            return x
        return self.method.reduce(x, self, layer, keys, cls_attention)

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
    proportional_attention = False
    track_source = False

    def __init__(self):
        super().__init__()
        self.last_tokens: Tokens | None = None

    def start(self, x: torch.Tensor) -> tuple[torch.Tensor, Tokens]:
        """Open a forward: the record of ``x`` [B, N, C] (CLS first) and ``x`` after :meth:`prepare`."""
        tokens = Tokens(self, x, track_source=self.track_source, proportional=self.proportional_attention)
        self.last_tokens = tokens
        return self.prepare(x, tokens), tokens

    def prepare(self, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        return x

    def reduces_at(self, layer: int) -> bool:
        return False

    def reduce(self, x: torch.Tensor, tokens: Tokens, layer: int, keys: torch.Tensor,
               cls_attention: torch.Tensor | None) -> torch.Tensor:
        return x

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary training loss of the last forward (DynamicViT's keep-ratio loss), else None."""
        return None
