"""Decoding one token at a time as a replayed CUDA graph.

An eager decoding step of a 12-layer LM launches hundreds of small kernels, and the GPU waits on
Python between them: at batch 8 a step takes milliseconds whatever the mixer. For models whose
decoding state has a fixed size (recurrent mixers: GLA, RetNet, DeltaNet, Mamba, ...), the whole
step can be captured once as a CUDA graph over static token and state buffers and replayed per
token. A KV cache grows by a token each step (attention keeps a Python position), so such
models are refused; they decode eagerly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def has_fixed_size_state(model: nn.Module) -> bool:
    """Whether every mixer of ``model`` decodes with a state whose size does not grow with the context
    (read from the mixers' ``state_size``): the models whose decoding step a CUDA graph can capture."""
    from zoo.models.base import outer_mixers

    return all(m.state_size(1) == m.state_size(2) for m in outer_mixers(model))


def state_leaves(tree: Any) -> list[Any]:
    """The leaves of a nest of dicts and lists (a model's decoding states), in a fixed order."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in state_leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in state_leaves(item)]
    return [tree]


class GraphedDecoder:
    """``step(ids [B, 1]) -> logits [B, vocab]`` through a captured CUDA graph of ``model.prefill``.

    ``states`` (from ``model.init_state`` and a prompt's ``model.prefill``) become the static
    buffers: each replay computes the next states and copies them into those buffers inside the
    graph, so no Python runs per token beyond the replay. The logits tensor is reused by every replay.

    ``compile=True`` captures the torch.compile'd step (``model.prefill`` and the copies into the state
    buffers, which then fuse with its last kernels): a replay still runs one kernel per node, and at
    batch 8 each costs ~2-3 us whatever its size, so fusing the step's elementwise work is what is left
    to gain (lm-125m-mamba2 on an H200: 2.8 -> 0.85 ms a step). It compiles once for the states' shapes
    (seconds, before the capture: compiling during a capture would invalidate it).
    """

    def __init__(self, model: nn.Module, states: list, warmup: int = 2, compile: bool = False):
        leaves = state_leaves(states)
        devices = {leaf.device.type for leaf in leaves if isinstance(leaf, torch.Tensor)}
        if devices != {"cuda"}:
            raise ValueError(f"cuda_graph decoding needs the model and its states on a CUDA device, got {sorted(devices)}")
        if not has_fixed_size_state(model):
            raise ValueError("cuda_graph decoding needs decoding states of a fixed size; this model's state grows "
                             "with the context (a growing KV cache or input cache): decode it eagerly")
        self.model, self.states = model, states
        batch = leaves[0].shape[0]
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=leaves[0].device)
        advance = torch.compile(self._advance, dynamic=False) if compile else self._advance
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # lazy initialisation (compiling, autotuning, workspaces) happens outside the capture
                advance(self.ids, self._copy(states))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = advance(self.ids, states)

    def _advance(self, ids: torch.Tensor, states: list) -> torch.Tensor:
        """One step that writes the next states into ``states`` (compiled, the copies fuse with the step's
        last kernels); returns the next-token logits [B, vocab]."""
        logits, new_states = self.model.prefill(ids, states)
        for dst, src in zip(state_leaves(states), state_leaves(new_states)):
            if dst is not src:
                dst.copy_(src)
        return logits[:, -1]

    @staticmethod
    def _copy(tree: Any) -> Any:
        """A copy of the states with the same strides (a state may be a strided view, e.g. the last inputs of a
        convolution), so a compiled step warmed up on it is not recompiled for the real buffers."""
        if isinstance(tree, dict):
            return {k: GraphedDecoder._copy(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(GraphedDecoder._copy(v) for v in tree)
        return torch.empty_strided(tree.shape, tree.stride(), dtype=tree.dtype, device=tree.device).copy_(tree)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Advance every sequence by the tokens ``ids [B, 1]``; returns the next-token logits [B, vocab]."""
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits
