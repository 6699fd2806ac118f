"""Capture of the video part of HunyuanVideo's joint-attention q/k, by swapping the processor of
every ``transformer_blocks.<i>.attn`` (double-stream) and ``single_transformer_blocks.<j>.attn``
(single-stream), as :mod:`.wan_capture` does for Wan (same :class:`LayerCapture`, same
:func:`capture_qk` contract). One layer numbering, as :mod:`.hunyuan`: double-stream block ``i``
is layer ``i``, single-stream block ``j`` is layer ``num_double + j``.

WEST's topology is video x video (the joint pass keeps text rows and columns dense), so only the
video rows of q/k are captured. In both block kinds the processor receives the video tokens as
``hidden_states`` (the single-stream block splits its ``[video | text]`` sequence before the
call) and computes them as ``HunyuanVideoAttnProcessor2_0`` does: projection, head split,
``norm_q``/``norm_k`` per head, RoPE on the video tokens (diffusers 0.42). The text never enters
the video rows of q/k, so they are the first ``F*H*W`` rows of what SDPA is fed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from .fingerprint import _unwrap
from .hunyuan import forward_inputs, latent_token_grid, self_attention_modules
from .wan_capture import CaptureState, LayerCapture

__all__ = ["CaptureState", "LayerCapture", "capture_qk", "video_qkv"]


def video_qkv(attn, hidden_states: torch.Tensor, image_rotary_emb) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(B, H, S_video, D)`` of the video tokens of a HunyuanVideo joint attention."""
    from diffusers.models.embeddings import apply_rotary_emb

    q = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
    k = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
    v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return tuple(x.transpose(1, 2) for x in (q, k, v))


class _CaptureProcessor:
    """Wraps a layer's original processor: computes the video q/k/v, calls back, then runs the
    original unchanged (the model's output is bit-identical)."""

    def __init__(self, original, layer: int, state: CaptureState, on_layer: Callable):
        self.original, self.layer, self.state, self.on_layer = original, layer, state, on_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        s = self.state
        if s.enabled:
            with torch.no_grad():
                q, k, v = video_qkv(attn, hidden_states, image_rotary_emb)
            s.calls += 1
            self.on_layer(LayerCapture(self.layer, q, k, s.grid, s.input_index, s.step_index,
                                       s.timestep, s.branch, v))
            del q, k, v
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                             image_rotary_emb, **kwargs)


@contextlib.contextmanager
def capture_qk(transformer, on_layer: Callable[[LayerCapture], None], *,
               layers: Sequence[int] | None = None) -> Iterator[CaptureState]:
    """Capture the video q/k of every joint attention (or of ``layers``, in the one numbering)
    during the ``with`` block (see :func:`.wan_capture.capture_qk`). The grid is each forward's
    video token grid, from its ``hidden_states [B, C, F, H, W]``."""
    model = _unwrap(transformer)
    state = CaptureState()
    modules = self_attention_modules(model)
    chosen = range(len(modules)) if layers is None else list(layers)
    originals = {}

    def grid_hook(module, args, kwargs):
        hidden, _ = forward_inputs(args, kwargs)
        state.grid = latent_token_grid(module, hidden.shape)

    handle = model.register_forward_pre_hook(grid_hook, with_kwargs=True)
    try:
        for i in chosen:
            originals[i] = modules[i].processor
            modules[i].processor = _CaptureProcessor(modules[i].processor, i, state, on_layer)
        yield state
    finally:
        handle.remove()
        for i, proc in originals.items():
            modules[i].processor = proc
