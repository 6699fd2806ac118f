"""The plan file's JSON metadata: its schema and its checksum.

``load_plan`` runs :func:`check_meta` on the parsed JSON before building anything from it, so
a hand-edited, truncated or foreign header fails with one line that names the field, what was
expected and what was found, instead of an ``AttributeError``/``TypeError`` from deep inside.

The checksum (:func:`meta_checksum`) is a sha256 of the canonical JSON of every field except
itself; it covers the tensors' sha256 list too, so one value vouches for the whole file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import SchemaError

BLOCK_SIZE = 128  # the kernel's block; a plan for another block size cannot be used
CODE_MAX = 255  # uint8 threshold codes (west.CODE_MAX)
CHECKSUM_KEY = "meta_sha256"


# ---- value checks: each returns None when the value is fine, else what was expected ---------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


def _int(lo: int | None = None, eq: int | None = None) -> Callable[[Any], str | None]:
    want = str(eq) if eq is not None else "an integer" if lo is None else f"an integer >= {lo}"

    def check(v):
        ok = _is_int(v) and (eq is None or v == eq) and (lo is None or v >= lo)
        return None if ok else want
    return check


def _ints(n: int, lo: int = 1) -> Callable[[Any], str | None]:
    def check(v):
        if not (isinstance(v, list) and len(v) == n and all(_is_int(x) and x >= lo for x in v)):
            return f"a list of {n} integers >= {lo}"
        return None
    return check


def _str(pattern: str | None = None) -> Callable[[Any], str | None]:
    def check(v):
        if not isinstance(v, str) or not v:
            return "a non-empty string"
        if pattern is not None and not re.fullmatch(pattern, v):
            return f"a string matching {pattern}"
        return None
    return check


def _obj(v) -> str | None:
    return None if isinstance(v, dict) else "a JSON object"


def _or_null(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def inner(v):
        if v is None:
            return None
        bad = check(v)
        return None if bad is None else f"{bad} or null"
    return inner


def _number(v) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return None if ok else "a finite number"


def _numbers(v) -> str | None:
    ok = isinstance(v, list) and all(_number(x) is None for x in v)
    return None if ok else "a list of finite numbers"


def _hex_map(v) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                     and re.fullmatch(r"[0-9a-f]{64}", x) for k, x in v.items())
    return None if ok else "a JSON object of tensor name -> sha256 hex"


_HEX16 = r"[0-9a-f]{16}"

# field -> (required, check). Every field PlanMeta has, plus what Plan.save adds.
FIELDS: dict[str, tuple[bool, Callable[[Any], str | None]]] = {
    "format": (True, _str()),
    "format_version": (True, _int()),
    "model_class": (True, _str(r"[A-Za-z_][A-Za-z0-9_]*")),
    "model_config": (True, _obj),
    "config_fingerprint": (True, _str(_HEX16)),
    "weights_fingerprint": (True, _or_null(_str(_HEX16))),
    "num_layers": (True, _int(lo=1)),
    "num_heads": (True, _int(lo=1)),
    "head_dim": (True, _int(lo=1)),
    "patch_size": (True, _ints(3)),
    "calib_grid": (True, _ints(3)),
    "num_calibration_inputs": (True, _int(lo=0)),
    "calibration": (False, _obj),
    "energy_filter": (False, _or_null(_obj)),
    "precision": (False, _str(r"bf16|fp8|int8")),  # contract/quant.py PRECISIONS
    "block_size": (False, _int(eq=BLOCK_SIZE)),
    "code_max": (False, _int(eq=CODE_MAX)),
    "schedule": (False, _or_null(_obj)),
    # "raster", "tile" or "tile:FxHxW" (token_order.py parses it); absent in older files.
    "token_order": (False, _str(r"raster|tile(:\d+x\d+x\d+)?")),
    "sha256": (True, _hex_map),
    CHECKSUM_KEY: (False, _str(r"[0-9a-f]{64}")),
}

# Keys inside nested objects that the package reads; other keys there are free-form.
CALIBRATION_FIELDS = {"latent_shape": _ints(4), "num_steps": _int(lo=1), "timesteps": _numbers,
                      "nb": _int(lo=1)}
SCHEDULE_INFO_FIELDS = {"target_density": _number, "achieved_density": _number,
                        "method": _str()}


def _describe(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(field: str, expected: str, got) -> None:
    raise SchemaError(f"field '{field}': expected {expected}, got {_describe(got)}")


def check_meta(meta: Any) -> None:
    """Raise :class:`SchemaError` naming the first field of ``meta`` that breaks the schema."""
    if not isinstance(meta, dict):
        raise SchemaError(f"the metadata must be a JSON object, got {type(meta).__name__} "
                          f"{_describe(meta)}")
    unknown = sorted(set(meta) - set(FIELDS))
    if unknown:
        raise SchemaError(f"unknown field(s) {unknown}; expected only {sorted(FIELDS)}")
    for name, (required, check) in FIELDS.items():
        if name not in meta:
            if required:
                raise SchemaError(f"field '{name}' is missing")
            continue
        bad = check(meta[name])
        if bad is not None:
            _fail(name, bad, meta[name])
    for sub, fields in (("calibration", CALIBRATION_FIELDS),):
        for name, check in fields.items():
            value = (meta.get(sub) or {}).get(name)
            if value is not None and (bad := check(value)) is not None:
                _fail(f"{sub}.{name}", bad, value)
    sched = meta.get("schedule")
    if sched is not None:
        info = sched.get("info", {})
        if not isinstance(info, dict):
            _fail("schedule.info", "a JSON object", info)
        for name, check in SCHEDULE_INFO_FIELDS.items():
            if info.get(name) is not None and (bad := check(info[name])) is not None:
                _fail(f"schedule.info.{name}", bad, info[name])
    cfg = meta["model_config"]
    for key in ("num_layers", "num_attention_heads", "attention_head_dim"):
        mine = {"num_layers": "num_layers", "num_attention_heads": "num_heads",
                "attention_head_dim": "head_dim"}[key]
        want, what = cfg.get(key), f"model_config.{key}"
        if key == "num_layers" and want is not None and "num_single_layers" in cfg:
            # HunyuanVideo: its single-stream blocks are layers too (after the double-stream)
            want, what = want + cfg["num_single_layers"], \
                "model_config.num_layers + num_single_layers"
        if want is not None and want != meta[mine]:
            _fail(mine, f"{what} = {_describe(want)}", meta[mine])


def canonical(meta: dict) -> bytes:
    """The bytes the checksum covers: sorted, compact JSON of all fields but the checksum."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def meta_checksum(meta: dict) -> str:
    return hashlib.sha256(canonical(meta)).hexdigest()


def describe_fit(info: dict) -> str | None:
    """One line on what a FAST schedule's fit minimised, for ``plan.summary`` (``scaling-attn
    show``); ``None`` for the default (the summed attention error), which needs no line."""
    if info.get("objective") != "video":
        return None
    r = info.get("response") or {}
    g, h = r.get("layer_gain") or [0.0], r.get("bucket_gain_by_step") or [0.0]
    return (f"FAST fit: objective video (error weighted by its measured cost in the video), "
            f"layer gains {min(g):.2f}..{max(g):.2f}, bucket gains by step "
            f"[{', '.join(f'{x:.3g}' for x in h)}], {r.get('generations', '?')} probe "
            f"generations in {r.get('probe_seconds', float('nan')):.1f} s")
