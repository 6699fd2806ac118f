"""Capture of self-attention q/k in a diffusers LTX-Video transformer, by swapping the processor
of every ``transformer_blocks.<i>.attn1`` (as :mod:`.wan_capture` does for Wan; same
:class:`LayerCapture`, same :func:`capture_qk` contract). q/k are computed as
``LTXVideoAttnProcessor`` feeds them to attention: projections, RMS norm across heads, RoPE on
the flat ``[B, S, H*D]`` tensor, then the head split. The original processor then runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from .fingerprint import _unwrap
from .ltx import forward_grid
from .wan_capture import CaptureState, LayerCapture

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


class _CaptureProcessor:
    """Wraps a layer's original processor: computes q/k/v, calls back, then runs the original."""

    def __init__(self, original, layer: int, state: CaptureState, on_layer: Callable):
        self.original, self.layer, self.state, self.on_layer = original, layer, state, on_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        s = self.state
        if s.enabled and encoder_hidden_states is None:  # self-attention only
            with torch.no_grad():
                q, k, v = self_attention_qkv(attn, hidden_states, image_rotary_emb)
            s.calls += 1
            self.on_layer(LayerCapture(self.layer, q, k, s.grid, s.input_index, s.step_index,
                                       s.timestep, s.branch, v))
            del q, k, v
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                             image_rotary_emb, **kwargs)


@contextlib.contextmanager
def capture_qk(transformer, on_layer: Callable[[LayerCapture], None], *,
               layers: Sequence[int] | None = None) -> Iterator[CaptureState]:
    """Capture self-attention q/k of ``transformer_blocks.<i>.attn1`` during the ``with`` block
    (see :func:`.wan_capture.capture_qk`). The grid is each forward's ``(num_frames, height,
    width)``."""
    model = _unwrap(transformer)
    state = CaptureState()
    blocks = model.transformer_blocks
    chosen = range(len(blocks)) if layers is None else list(layers)
    originals = {}

    def grid_hook(module, args, kwargs):
        state.grid = forward_grid(module, args, kwargs)

    handle = model.register_forward_pre_hook(grid_hook, with_kwargs=True)
    try:
        for i in chosen:
            attn = blocks[i].attn1
            originals[i] = attn.processor
            attn.processor = _CaptureProcessor(attn.processor, i, state, on_layer)
        yield state
    finally:
        handle.remove()
        for i, proc in originals.items():
            blocks[i].attn1.processor = proc
