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

from collections.abc import Callable, Sequence

import torch

from . import capture
from .capture import CaptureState, LayerCapture
from .hunyuan import forward_inputs, latent_token_grid, self_attention_modules

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


def _grid(module, args, kwargs):
    hidden, _ = forward_inputs(args, kwargs)
    return latent_token_grid(module, hidden.shape)


def capture_qk(transformer, on_layer: Callable[[LayerCapture], None], *,
               layers: Sequence[int] | None = None):
    """Capture the video q/k of every joint attention (or of ``layers``, in the one numbering)
    during the ``with`` block (see :func:`.capture.capture_qk`). The grid is each forward's
    video token grid, from its ``hidden_states [B, C, F, H, W]``. Every call is captured: the
    joint attention always has text, so the Wan/LTX self-attention test does not apply."""
    return capture.capture_qk(transformer, on_layer, layers=layers,
                              modules=self_attention_modules, grid_of=_grid, qkv=video_qkv,
                              rotary_name="image_rotary_emb", self_only=False)
