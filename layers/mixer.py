"""The mixer interface: every token mixer (attention and its efficient replacements) implements it.

A mixer maps ``x: [B, T, D] -> y: [B, T, D]`` and can decode one token at a time through
``init_state`` / ``step``. Capabilities are class attributes so that models can check them
before building anything.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from layers.registry import Registry, check_kwargs, signature_kwargs

MIXERS = Registry("mixer")

State = dict[str, Any]

QK_NORM_EPS = 1e-6  # the eps of the ``qk_norm`` RMSNorms (OLMo-2's)


class Mixer(nn.Module):
    """Base class of all mixers.

    Subclasses implement ``forward`` and ``step``/``init_state``; ``prefill`` defaults to a loop
    of ``step`` calls and is overridden where a parallel prefill exists.
    """

    supports_causal: bool = True
    supports_bidirectional: bool = True
    supports_mask: bool = True
    qk_norm: bool = False  # set per instance by ``_setup_qk_norm`` (mixers with queries and keys)

    def __init__(self, dim: int, num_heads: int, causal: bool = True):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        name = type(self).__name__
        if causal and not self.supports_causal:
            raise ValueError(f"{name} does not support causal=True (it is bidirectional only)")
        if not causal and not self.supports_bidirectional:
            raise ValueError(f"{name} does not support causal=False (it is causal only; the bidirectional wrapper runs "
                             f"it both ways: {{'name': 'bidirectional', 'inner': {{'name': ...}}}})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal

    def _setup_qk_norm(self, qk_norm: bool, head_dim: int, eps: float = QK_NORM_EPS) -> None:
        """The ``qk_norm`` option of the mixers that compute queries and keys: with ``qk_norm=True``, a per-head
        RMSNorm over the last (head) dim with a learnable weight of size ``head_dim`` (``q_norm``, ``k_norm``;
        OLMo-2 / ViT-22B / timm's ``qk_norm``), applied by ``_normalize_qk`` right after the q/k projections and
        before any feature map, rotary embedding, decay or chunking. ``qk_norm=False`` adds no parameter."""
        if not isinstance(qk_norm, bool):
            raise ValueError(f"qk_norm must be a bool, got {qk_norm!r}")
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=eps)

    def _normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k with heads in the last dim (any layout before it); unchanged without ``qk_norm``. The norm is
        computed in float32 and cast back to each input's dtype."""
        if not self.qk_norm:
            return q, k
        norm = lambda t, n: F.rms_norm(t.float(), n.normalized_shape, n.weight.float(), n.eps).to(t.dtype)
        return norm(q, self.q_norm), norm(k, self.k_norm)

    def check_input(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Raise a clear error for inputs of the wrong rank, width, dtype or mask shape."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, seq_len, {self.dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if mask is None:
            return
        if not self.supports_mask:
            raise ValueError(f"{type(self).__name__} does not accept a padding mask")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> State:
        raise NotImplementedError(f"{type(self).__name__} has no incremental decoding")

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError(f"{type(self).__name__} has no incremental decoding")

    def prefill(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Consume a whole prompt ``x: [B, T, D]`` into ``state``; the default loops ``step``."""
        outputs = []
        for t in range(x.shape[1]):
            y_t, state = self.step(x[:, t : t + 1], state)
            outputs.append(y_t)
        return torch.cat(outputs, dim=1), state

    def state_size(self, seq_len: int) -> int:
        """Floats kept per sequence while decoding after ``seq_len`` tokens (as counted in Zoology)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        qk = ", qk_norm=True" if self.qk_norm else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}{qk}"


def fill_accepted(cls: type[Mixer], kwargs: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a model's ``defaults`` filled in where ``cls``'s constructor takes them (through
    ``cls.fill_defaults`` where it has one, e.g. a wrapper that passes them on to the mixer it wraps); options in
    ``kwargs`` win."""
    hook = getattr(cls, "fill_defaults", None)
    if hook is not None:
        return hook(kwargs, defaults)
    accepted = set(signature_kwargs(cls.__init__) or []) - {"self", "dim", "num_heads", "causal"}
    return {**{k: v for k, v in defaults.items() if k in accepted}, **kwargs}


def register_mixer(name: str):
    """Class decorator: ``@register_mixer("gla") class GLA(Mixer): ...``."""

    def decorator(cls: type[Mixer]) -> type[Mixer]:
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"register_mixer({name!r}) must decorate a Mixer subclass")
        MIXERS.register(name, cls)  # first, so a refused (duplicate) registration leaves cls untouched
        cls.mixer_name = name
        return cls

    return decorator


def get_mixer_class(name: str) -> type[Mixer]:
    return MIXERS.get(name)


def create_mixer(name: str, dim: int, num_heads: int, causal: bool = True, **kwargs) -> Mixer:
    """Build the registered mixer ``name``; unknown keyword arguments raise a TypeError naming them."""
    cls = MIXERS.get(name)
    allowed = signature_kwargs(cls.__init__)
    if allowed is not None:
        check_kwargs(f"mixer {name!r}", kwargs, [a for a in allowed if a not in ("self", "dim", "num_heads", "causal")])
    return cls(dim, num_heads, causal=causal, **kwargs)


def list_mixers(pattern: str = "*") -> list[str]:
    return MIXERS.names(pattern)


def parse_mixer_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A mixer spec is a name or a mapping ``{name: ..., **kwargs}`` (as in Zoology configs)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"a mixer spec mapping needs a 'name' key, got keys {sorted(spec)}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return spec["name"], kwargs
    raise TypeError(f"mixer spec must be a name or a mapping with 'name', got {type(spec).__name__}")
