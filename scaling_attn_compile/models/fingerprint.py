"""Model fingerprints a plan records: the architecture config of a diffusers model and a
sampled hash of weight tensors. Which tensors are hashed is the adapter's (``wan.weights_fingerprint``).
"""

from __future__ import annotations

import hashlib
import json

import torch


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def model_config(transformer) -> dict:
    """The architecture config of a diffusers transformer, JSON-able, private keys dropped."""
    cfg = dict(_unwrap(transformer).config)
    out = {}
    for k, v in sorted(cfg.items()):
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def config_fingerprint(config: dict) -> str:
    """sha256 (16 hex) of the sorted JSON of an architecture config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_tensors(tensors, samples: int = 1024) -> str | None:
    """The weights fingerprint of ``tensors`` in order (``blocks.<i>.attn1.to_q/to_k.weight``
    for i = 0, 1, ...); ``None`` if any is a meta tensor. Shared by :func:`weights_fingerprint`
    and the backend's check, which only sees the Dynamo graph's parameter tensors."""
    h = hashlib.sha256()
    for w in tensors:
        if w.is_meta:
            return None
        if hasattr(w, "dequantize") and type(w) not in (torch.Tensor, torch.nn.Parameter):
            w = w.dequantize()  # a quantized subclass (torchao's Float8Tensor cannot reshape)
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples]
        h.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
