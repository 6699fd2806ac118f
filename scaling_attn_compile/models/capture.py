"""What every family's q/k capture shares: the record a callback receives, the session state, and
the processor swap.

A family's capture module (``wan_capture``, ``ltx_capture``, ``hunyuan_capture``) supplies only
what differs: which attention modules are its self-attention layers, how it computes q/k/v
exactly as its processor feeds them to SDPA, the name of its RoPE argument, and how a forward's
inputs give the token grid. :func:`capture_qk` does the rest: it wraps each chosen module's
processor, hands the callback a :class:`LayerCapture` per (call, layer), runs the original
processor unchanged (so the model's output is bit-identical), and restores the processors on
exit, even on error. The driver that denoises and captures is
:func:`..offline.calibrate.capture_self_attention` (or the pipeline driver in ``offline/pipeline``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .fingerprint import _unwrap

Grid = tuple[int, int, int]
QKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (attn, hidden, rotary)


@dataclass
class LayerCapture:
    """What a capture callback receives for one self-attention call.

    ``q, k``: ``(B, H, S, D)`` views (of ``(B, S, H, D)`` memory) in the model's dtype, as SDPA
    receives them. ``grid``: token grid ``(F, H, W)``, ``S = F * H * W``. The rest is the
    driver's state (``None`` when you run the model yourself without setting it).
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    grid: Grid | None
    input_index: int | None = None
    step_index: int | None = None
    timestep: float | None = None
    branch: str = ""
    v: torch.Tensor | None = None  # (B, H, S, D) like q/k; FAST's output-error profile reads it


@dataclass
class CaptureState:
    """Mutable state of a :func:`capture_qk` session; the driver sets the step fields."""

    enabled: bool = True
    grid: Grid | None = None
    input_index: int | None = None
    step_index: int | None = None
    timestep: float | None = None
    branch: str = ""
    calls: int = 0
    extra: dict = field(default_factory=dict)


class CaptureProcessor:
    """Wraps a layer's original processor: computes q/k/v with ``qkv``, calls back, then runs the
    original with the same arguments. ``rotary_name``: the family's RoPE argument (Wan
    ``rotary_emb``, LTX and HunyuanVideo ``image_rotary_emb``), passed by position or by name.
    ``self_only``: capture only calls without ``encoder_hidden_states`` (a module that also
    serves cross-attention); HunyuanVideo's joint attention always has text, so it captures all."""

    def __init__(self, original, layer: int, state: CaptureState, on_layer: Callable, *,
                 qkv: QKV, rotary_name: str, self_only: bool):
        self.original, self.layer, self.state, self.on_layer = original, layer, state, on_layer
        self.qkv, self.rotary_name, self.self_only = qkv, rotary_name, self_only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        s = self.state
        if s.enabled and not (self.self_only and encoder_hidden_states is not None):
            rotary = args[0] if args else kwargs.get(self.rotary_name)
            with torch.no_grad():
                q, k, v = self.qkv(attn, hidden_states, rotary)
            s.calls += 1
            self.on_layer(LayerCapture(self.layer, q, k, s.grid, s.input_index, s.step_index,
                                       s.timestep, s.branch, v))
            del q, k, v
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                             *args, **kwargs)


@contextlib.contextmanager
def capture_qk(transformer, on_layer: Callable[[LayerCapture], None], *,
               modules: Callable[[torch.nn.Module], Sequence[torch.nn.Module]],
               grid_of: Callable[[torch.nn.Module, tuple, dict], Grid | None],
               qkv: QKV, rotary_name: str, self_only: bool,
               layers: Sequence[int] | None = None) -> Iterator[CaptureState]:
    """Capture q/k of ``modules(model)`` (or of ``layers`` among them) during the ``with`` block.

    ``on_layer(LayerCapture)`` runs synchronously inside the forward, once per (call, layer), so
    q/k of one layer at a time are alive (Wan 14B at 720p: 2 x 774 MB in bf16). Set
    ``state.enabled = False`` to run forwards without capturing. ``grid_of(model, args, kwargs)``
    reads each forward's token grid (a forward pre-hook; ``None`` leaves it unchanged)."""
    model = _unwrap(transformer)
    state = CaptureState()
    attns = modules(model)
    chosen = range(len(attns)) if layers is None else list(layers)
    originals = {}

    def grid_hook(module, args, kwargs):
        grid = grid_of(module, args, kwargs)
        if grid is not None:
            state.grid = grid

    handle = model.register_forward_pre_hook(grid_hook, with_kwargs=True)
    try:
        for i in chosen:
            originals[i] = attns[i].processor
            attns[i].processor = CaptureProcessor(attns[i].processor, i, state, on_layer,
                                                  qkv=qkv, rotary_name=rotary_name,
                                                  self_only=self_only)
        yield state
    finally:
        handle.remove()
        for i, proc in originals.items():
            attns[i].processor = proc
