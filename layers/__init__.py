"""effzoo building blocks: token mixers and the common blocks models are made of.

A layer never imports from ``zoo``. Importing this package registers every built-in mixer.
"""
from timm.layers import DropPath

from layers import (  # noqa: F401  (registers the mixers)
    based, bidirectional, block_sparse, cosformer, deltanet, gated_deltanet, gla, hyena, linear_attention, linformer,
    mamba, mamba2, nystromformer, performer, retnet, rwkv6, s4d, sliding_window,
)
from layers.attention import Attention, naive_attention
from layers.mixer import Mixer, create_mixer, get_mixer_class, list_mixers, parse_mixer_spec, register_mixer
from layers.mlp import SwiGLU, create_mlp, gelu_mlp
from layers.moe import MoE, MoEAux, count_params
from layers.norm import LayerNorm, RMSNorm, create_norm
from layers.patch_embed import PatchEmbed
from layers.rotary import RotaryEmbedding

__all__ = [
    "Attention", "DropPath", "LayerNorm", "Mixer", "MoE", "MoEAux", "PatchEmbed", "RMSNorm", "RotaryEmbedding", "SwiGLU",
    "count_params", "create_mixer", "create_mlp", "create_norm", "gelu_mlp", "get_mixer_class", "list_mixers",
    "naive_attention", "parse_mixer_spec", "register_mixer",
]
