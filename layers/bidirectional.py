"""The ``bidirectional`` wrapper: any causal mixer made bidirectional (as Vision Mamba does with Mamba)
for ViT / encoder models.

    y = fwd(x) + flip(bwd(flip(x)))                          combine="add" (default)
    y = W [fwd(x), flip(bwd(flip(x)))]                       combine="concat" (W: 2 dim -> dim, no bias)

``fwd`` and ``bwd`` are two causal instances of the ``inner`` mixer (one shared instance with
``share=True``); flip reverses time. ``inner`` is a mixer spec: a registered name or a mapping
``{name: ..., **options}``, so a config line ``{name: bidirectional, inner: {name: gla, expand_k: 1.0}}``
builds through ``create_mixer``. Padding masks are flipped with x (a right-padded batch becomes
left-padded); the inner mixer's own mask handling then makes each real token see exactly its own
sequence, in both directions. The wrapper reads future tokens, so it cannot decode token by token.

A model's own options for its mixers (``max_seq_len`` for fixed-length mixers such as cosformer, timm's
biases for ViTs) reach the inner mixer through :meth:`Bidirectional.fill_defaults`, which a model's
mixer builder calls: each option goes into the inner spec where the inner mixer's constructor takes it
and the spec does not set it already.

Tolerances (tests): float32, 1e-5 of ``max(1, max|expected|)``; the wrapper adds no arithmetic of its
own beyond the sum / projection, so it inherits the inner mixer's bf16 accuracy.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from layers.mixer import Mixer, create_mixer, fill_accepted, get_mixer_class, parse_mixer_spec, register_mixer
from layers.registry import signature_kwargs

COMBINES = ("add", "concat")
DEFAULT_INNER = "gla"


@register_mixer("bidirectional")
class Bidirectional(Mixer):
    """A forward and a backward causal ``inner`` mixer, combined; bidirectional only (``causal=False``).

    Options: ``inner`` (a mixer spec, default ``"gla"``; the mixer must support ``causal=True``),
    ``share`` (False: separate weights per direction; True: one module for both), ``combine``
    (``"add"`` or ``"concat"``). Modules: ``fwd``, ``bwd`` (the same object with ``share``), ``proj``
    (``concat`` only). Padding masks need an inner mixer that accepts them.
    """

    supports_causal = False

    def __init__(self, dim: int, num_heads: int, causal: bool = False, inner: str | Mapping[str, Any] = DEFAULT_INNER,
                 share: bool = False, combine: str = "add"):
        super().__init__(dim, num_heads, causal)
        try:
            name, kwargs = parse_mixer_spec(inner)
            cls = get_mixer_class(name)
        except (TypeError, ValueError) as e:
            raise ValueError(f"inner: {e}") from None
        if "causal" in kwargs:
            raise ValueError(f"inner: the inner mixer's causal option is set by the wrapper (always causal=True), "
                             f"got causal={kwargs['causal']!r}")
        if not cls.supports_causal:
            raise ValueError(f"inner mixer {name!r} cannot run causally (supports_causal=False); bidirectional needs "
                             "a causal inner mixer, e.g. gla, retnet, deltanet, linear")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}; got {combine!r}")
        make = lambda: create_mixer(name, dim, num_heads, causal=True, **kwargs)
        self.inner_name, self.share, self.combine = name, bool(share), combine
        self.fwd = make()
        self.bwd = self.fwd if self.share else make()
        self.proj = nn.Linear(2 * dim, dim, bias=False) if combine == "concat" else None

    @classmethod
    def fill_defaults(cls, kwargs: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
        """``kwargs`` (this wrapper's options) with a model's ``defaults`` filled in: the wrapper's own options
        where its constructor takes them, and the inner spec's options where the inner mixer's constructor
        takes them (recursively through an inner wrapper). Options already given win; ``causal`` is never
        filled (the wrapper sets it). An invalid inner spec is left as given, for ``__init__`` to report."""
        own = set(signature_kwargs(cls.__init__) or []) - {"self", "dim", "num_heads", "causal", "inner"}
        out = {**{k: v for k, v in defaults.items() if k in own}, **kwargs}
        spec = kwargs.get("inner", DEFAULT_INNER)
        try:
            name, inner_kwargs = parse_mixer_spec(spec)
            inner_cls = get_mixer_class(name)
        except (TypeError, ValueError):
            return out
        filled = fill_accepted(inner_cls, inner_kwargs, {k: v for k, v in defaults.items() if k != "causal"})
        if filled != inner_kwargs:
            out["inner"] = {"name": name, **filled}
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        if mask is not None and not self.fwd.supports_mask:
            raise ValueError(f"inner mixer {self.inner_name!r} does not accept a padding mask; use an inner mixer "
                             "that does, or no mask")
        flip = lambda t: None if t is None else t.flip(1)
        y_fwd = self.fwd(x, mask=mask)
        y_bwd = flip(self.bwd(flip(x), mask=flip(mask)))
        y = y_fwd + y_bwd if self.proj is None else self.proj(torch.cat([y_fwd, y_bwd], dim=-1))
        return y if mask is None else y * mask[..., None].to(y.dtype)

    def _no_decoding(self, *args, **kwargs):
        raise ValueError("the bidirectional mixer reads future tokens (causal=False): it has no incremental decoding "
                         "(init_state / prefill / step)")

    init_state = prefill = step = _no_decoding

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inner={self.inner_name!r}, share={self.share}, combine={self.combine!r}"
