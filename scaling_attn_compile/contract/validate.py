"""The table contract, checked: what the op accepts (:func:`validate_inputs`, shapes and dtypes,
every call), the values of one layer's tables (:func:`check_tables`, opt-in: it syncs), what
the backend binds for a grid (:func:`check_attention_tables`) and what the Triton kernel
supports beyond the op (:func:`validate_kernel_inputs`, :data:`KERNEL_DTYPES`, :data:`HEAD_DIMS`).
"""

from __future__ import annotations

import math

import torch

from ..errors import PlanMismatchError
from .masks import ENERGY_RULES, WORD_BITS, num_blocks, num_words
from .tables import AttentionTables

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


HEAD_DIMS = (64, 128)


def _check(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


def validate_inputs(q, k, v, masks, level_table, bucket_bounds, timestep) -> None:
    """Raise ValueError/TypeError naming the argument, what was expected and what was got."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.dim() == 4, ValueError,
               f"sparse_attention: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    _check(k.shape == q.shape and v.shape == q.shape, ValueError,
           "sparse_attention: q, k and v must have the same shape (self-attention, Sq == Sk), got "
           f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, TypeError,
           f"sparse_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.dtype.is_floating_point, TypeError,
           f"sparse_attention: q must be a floating-point tensor, got {q.dtype}")
    _check(k.device == q.device and v.device == q.device, ValueError,
           f"sparse_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, S, D = q.shape
    nb, nw = num_blocks(S), num_words(S)
    _check(masks.dtype == torch.int32, TypeError,
           f"sparse_attention: masks must be int32 bit-packed words, got {masks.dtype}")
    _check(masks.dim() == 4 and masks.shape[0] == H and masks.shape[2] == nb
           and masks.shape[3] == nw and masks.shape[1] >= 1, ValueError,
           f"sparse_attention: masks must have shape (H={H}, L>=1, NB={nb}, W={nw}) for S={S}, "
           f"got {tuple(masks.shape)}; materialise the plan for this sequence length")
    _check(level_table.dtype == torch.int32, TypeError,
           f"sparse_attention: level_table must be int32, got {level_table.dtype}")
    _check(bucket_bounds.dim() == 1, ValueError,
           f"sparse_attention: bucket_bounds must be 1-D (NT - 1,), got {tuple(bucket_bounds.shape)}")
    _check(bucket_bounds.dtype == torch.float32, TypeError,
           f"sparse_attention: bucket_bounds must be float32, got {bucket_bounds.dtype}")
    nt = bucket_bounds.numel() + 1
    _check(level_table.dim() == 2 and tuple(level_table.shape) == (nt, H), ValueError,
           f"sparse_attention: level_table must have shape (NT={nt}, H={H}), got "
           f"{tuple(level_table.shape)}")
    _check(timestep.dim() == 0 or (timestep.dim() == 1 and timestep.shape[0] in (1, B)), ValueError,
           f"sparse_attention: timestep must have shape ({B},) or (), got {tuple(timestep.shape)}")
    for name, t in (("masks", masks), ("level_table", level_table),
                    ("bucket_bounds", bucket_bounds), ("timestep", timestep)):
        _check(t.device == q.device, ValueError,
               f"sparse_attention: {name} must be on q's device {q.device}, got {t.device}")


def validate_kv_lens(kv_lens, q) -> None:
    """``kv_lens`` (optional): int32 ``(B,)`` on q's device. Values are not checked (a host
    sync); out-of-range ones are clamped to ``[0, S]`` (``reference.py``)."""
    if kv_lens is None:
        return
    B = q.shape[0]
    _check(kv_lens.dtype == torch.int32, TypeError,
           f"sparse_attention: kv_lens must be int32, got {kv_lens.dtype}; pass "
           "lengths.to(torch.int32)")
    _check(kv_lens.dim() == 1 and kv_lens.shape[0] == B, ValueError,
           f"sparse_attention: kv_lens must have shape ({B},) (one key length per batch "
           f"element), got {tuple(kv_lens.shape)}")
    _check(kv_lens.device == q.device, ValueError,
           f"sparse_attention: kv_lens must be on q's device {q.device}, got {kv_lens.device}")


def validate_launch_order(launch_order, q, bucket_bounds) -> None:
    """``launch_order`` (optional): int32 ``(NT, H * NB)`` on q's device. Values are not checked
    per call (a host sync): out-of-range ones are clamped by the kernel, and
    :func:`check_tables` checks that each row is a permutation (else rows go uncomputed)."""
    if launch_order is None:
        return
    B, H, S, _ = q.shape
    nt, nb = bucket_bounds.numel() + 1, num_blocks(S)
    _check(launch_order.dtype == torch.int32, TypeError,
           f"sparse_attention: launch_order must be int32, got {launch_order.dtype}; build it "
           "with contract.masks.launch_order(masks, level_table, S)")
    _check(launch_order.dim() == 2 and launch_order.shape[0] >= nt
           and launch_order.shape[1] == H * nb, ValueError,
           f"sparse_attention: launch_order must have shape (NT>={nt}, H*NB={H * nb}) for "
           f"{H} heads and S={S}, got {tuple(launch_order.shape)}; build it with "
           "contract.masks.launch_order(masks, level_table, S)")
    _check(launch_order.device == q.device, ValueError,
           f"sparse_attention: launch_order must be on q's device {q.device}, got "
           f"{launch_order.device}")


def check_tables(masks: torch.Tensor, level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                 seq_len: int, timestep: torch.Tensor | None = None, *,
                 launch_order: torch.Tensor | None = None) -> None:
    """Opt-in value checks of one layer's tables (and a timestep) for ``seq_len`` tokens.

    Raises ValueError naming the table, the bad value and where it is: levels outside
    ``[0, L)``, mask bits of KV blocks past ``NB``, NaN or descending ``bucket_bounds``, a NaN
    ``timestep``. The op itself never raises on these (see the module docstring); this reads
    the values, so on CUDA it synchronises: call it when tables are made, not every step.
    """
    nb, nw = num_blocks(seq_len), num_words(seq_len)
    _check(masks.dtype == torch.int32 and masks.dim() == 4 and masks.shape[2] == nb
           and masks.shape[3] == nw and masks.shape[1] >= 1, ValueError,
           f"check_tables: masks must be int32 (H, L>=1, NB={nb}, W={nw}) for S={seq_len}, got "
           f"{masks.dtype} {tuple(masks.shape)}; materialise the tables for this length")
    H, L = masks.shape[0], masks.shape[1]
    _check(bucket_bounds.dtype == torch.float32 and bucket_bounds.dim() == 1, ValueError,
           f"check_tables: bucket_bounds must be float32 (NT - 1,), got {bucket_bounds.dtype} "
           f"{tuple(bucket_bounds.shape)}")
    nt = bucket_bounds.numel() + 1
    _check(level_table.dtype == torch.int32 and tuple(level_table.shape) == (nt, H), ValueError,
           f"check_tables: level_table must be int32 (NT={nt}, H={H}), got {level_table.dtype} "
           f"{tuple(level_table.shape)}")
    bad = (level_table < 0) | (level_table >= L)
    if bool(bad.any()):
        t, h = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"check_tables: level_table[{t}, {h}] = {int(level_table[t, h])}, but masks has L={L} "
            f"levels: expected values in [0, {L - 1}] ({int(bad.sum())} entries outside; the op "
            f"would clamp them); rebuild the level table")
    spare = nw * WORD_BITS - nb  # bits of the last word past NB
    if spare:
        high = torch.tensor(-(1 << (WORD_BITS - spare)), dtype=torch.int32, device=masks.device)
        stray = (masks[..., -1] & high) != 0  # (H, L, NB)
        if bool(stray.any()):
            h, lv, u = (int(i) for i in stray.nonzero()[0])
            raise ValueError(
                f"check_tables: masks[{h}, {lv}, {u}] sets bits of KV blocks >= NB={nb} (S="
                f"{seq_len}) in its last word ({int(stray.sum())} rows do; the op ignores them); "
                "expected zeros there: pack block masks with masks.pack_blocks")
    b = bucket_bounds
    _check(not bool(b.isnan().any()), ValueError,
           f"check_tables: bucket_bounds must not contain NaN, got {b.tolist()}")
    _check(b.numel() < 2 or bool((b[1:] >= b[:-1]).all()), ValueError,
           f"check_tables: bucket_bounds must be ascending, got {b.tolist()}; sort them")
    if launch_order is not None:  # a row that is no permutation leaves query blocks unwritten
        n = H * nb
        _check(launch_order.dim() == 2 and launch_order.shape[0] >= nt
               and launch_order.shape[1] == n, ValueError,
               f"check_tables: launch_order must be (NT>={nt}, H*NB={n}), got "
               f"{tuple(launch_order.shape)}")
        want = torch.arange(n, device=launch_order.device)
        for t in range(launch_order.shape[0]):
            if not torch.equal(launch_order[t].sort().values.long(), want):
                raise ValueError(
                    f"check_tables: launch_order[{t}] is not a permutation of [0, {n}) (H*NB); "
                    "the kernel would leave some query blocks unwritten: build it with "
                    "contract.masks.launch_order(masks, level_table, S)")
    if timestep is not None:
        _check(not bool(timestep.isnan().any()), ValueError,
               "check_tables: timestep is NaN; the op would use bucket 0 (no bound is <= NaN); "
               "pass the scheduler's timestep")


def validate_kernel_inputs(q, *, interpret: bool = False) -> None:
    """What the Triton kernel supports beyond the op's semantics."""
    _check(q.is_cuda or interpret, ValueError,
           f"block-sparse kernel: tensors must be CUDA tensors, got device {q.device} "
           "(the op runs the reference on the CPU; set TRITON_INTERPRET=1 to interpret the kernel)")
    _check(q.dtype in KERNEL_DTYPES or (interpret and q.dtype == torch.float32), TypeError,
           f"block-sparse kernel: dtype must be float16 or bfloat16, got {q.dtype}; cast q, k, "
           "v (float64 runs only on the CPU, through the reference)")
    _check(not (interpret and q.dtype == torch.bfloat16), TypeError,
           "block-sparse kernel: bfloat16 in Triton's interpreter gives garbage (its bf16 tl.dot "
           "is broken: errors of 1e8-1e10); use float16 or float32 on the CPU, bfloat16 on a GPU")
    _check(q.shape[-1] in HEAD_DIMS, ValueError,
           f"block-sparse kernel: head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")


def check_site_fits_kernel(path: str, q, head_dim_plan: int | None) -> None:
    """A self-attention site the pass rewrites (``path``, its example ``q`` ``(B, H, S, D)``):
    the plan's head_dim, and on CUDA a dtype and head_dim the kernel supports. Raises
    :class:`PlanMismatchError` at compile time, naming the fix (the full-graph and the regional
    pass share it)."""
    d = q.shape[-1]
    if head_dim_plan is not None and d != head_dim_plan:
        raise PlanMismatchError(
            f"scaling_attn_backend: {path} has head_dim {d}, the plan was made for "
            f"head_dim {head_dim_plan}; use the plan made for this model")
    if q.device.type == "cuda" and (q.dtype not in KERNEL_DTYPES or d not in HEAD_DIMS):
        raise PlanMismatchError(
            f"scaling_attn_backend: {path} runs {q.dtype} with head_dim {d} on CUDA; the "
            f"kernel supports dtypes {KERNEL_DTYPES} and head_dim in {HEAD_DIMS}; cast the "
            "transformer, e.g. transformer.to(torch.bfloat16)")


def validate_energy(energy_rule: int, energy_threshold: float) -> None:
    _check(energy_rule in ENERGY_RULES.values(), ValueError,
           f"sparse_attention: energy_rule must be one of {ENERGY_RULES}, got {energy_rule}")
    _check(not math.isnan(energy_threshold), ValueError,
           "sparse_attention: energy_threshold must be a number (natural-log units), got nan")


def check_attention_tables(tables: AttentionTables, grid) -> None:
    if not all(hasattr(tables, a) for a in ("grid", "masks", "level_tables", "bucket_bounds")):
        raise TypeError(
            "scaling_attn_backend: the plan must give AttentionTables (grid, masks, "
            f"level_tables, bucket_bounds), got {type(tables).__name__}")
    if tuple(tables.grid) != tuple(grid):
        raise PlanMismatchError(
            f"scaling_attn_backend: the plan's tables are for latent grid {tuple(tables.grid)}, "
            f"the model runs grid {tuple(grid)} (F, H, W after patching); pass a Plan "
            "(with .materialize(grid)) or a callable grid -> AttentionTables so the backend can "
            "materialise the tables for each resolution")
    s = math.prod(grid) + getattr(tables, "text_len", 0)  # joint [video | text] tables
    nb, nw = num_blocks(s), num_words(s)
    if len(tables.masks) != len(tables.level_tables):
        raise PlanMismatchError(
            f"scaling_attn_backend: the plan has {len(tables.masks)} mask tables but "
            f"{len(tables.level_tables)} level tables; rebuild the plan")
    nt = tables.bucket_bounds.numel() + 1
    b = tables.bucket_bounds.float()
    if tables.bucket_bounds.dim() != 1 or (b[1:] < b[:-1]).any():
        raise PlanMismatchError(
            "scaling_attn_backend: bucket_bounds must be 1-D ascending, got "
            f"{b.tolist()}; rebuild the plan")
    for i, (m, lt) in enumerate(zip(tables.masks, tables.level_tables, strict=True)):
        if m.dtype != torch.int32 or m.dim() != 4 or m.shape[2] != nb or m.shape[3] != nw:
            raise PlanMismatchError(
                f"scaling_attn_backend: layer {i} masks must be int32 (H, L, NB={nb}, W={nw}) "
                f"for grid {tuple(grid)} (S={s}), got {m.dtype} {tuple(m.shape)}; "
                "materialise the plan for this grid")
        if lt.dtype != torch.int32 or tuple(lt.shape) != (nt, m.shape[0]):
            raise PlanMismatchError(
                f"scaling_attn_backend: layer {i} level_table must be int32 (NT={nt}, "
                f"H={m.shape[0]}), got {lt.dtype} {tuple(lt.shape)}; rebuild the plan")
        if lt.numel() and (int(lt.min()) < 0 or int(lt.max()) >= m.shape[1]):
            raise PlanMismatchError(
                f"scaling_attn_backend: layer {i} level_table holds levels "
                f"[{int(lt.min())}, {int(lt.max())}] but the masks have {m.shape[1]} levels; "
                "rebuild the plan")
