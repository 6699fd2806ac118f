"""Capture of self-attention q/k in a diffusers LTX-Video transformer, by swapping the processor
of every ``transformer_blocks.<i>.attn1`` (the shared swap of :mod:`.capture`). q/k are computed as
``LTXVideoAttnProcessor`` feeds them to attention: projections, RMS norm across heads, RoPE on
the flat ``[B, S, H*D]`` tensor, then the head split. The original processor then runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import capture
from .capture import CaptureState, LayerCapture
from .ltx import forward_grid

__all__ = ["CaptureState", "LayerCapture", "capture_qk", "self_attention_qkv"]


def self_attention_qkv(attn, hidden_states: torch.Tensor, image_rotary_emb
                       ) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(B, H, S, D)`` of an ``LTXAttention`` self-attention call."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    q = attn.norm_q(attn.to_q(hidden_states))
    k = attn.norm_k(attn.to_k(hidden_states))
    v = attn.to_v(hidden_states)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb)
        k = apply_rotary_emb(k, image_rotary_emb)
    return tuple(x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))


def capture_qk(transformer, on_layer: Callable[[LayerCapture], None], *,
               layers: Sequence[int] | None = None):
    """Capture self-attention q/k of ``transformer_blocks.<i>.attn1`` during the ``with`` block
    (see :func:`.capture.capture_qk`). The grid is each forward's ``(num_frames, height,
    width)``."""
    return capture.capture_qk(transformer, on_layer, layers=layers,
                              modules=lambda m: [b.attn1 for b in m.transformer_blocks],
                              grid_of=forward_grid, qkv=self_attention_qkv,
                              rotary_name="image_rotary_emb", self_only=True)
