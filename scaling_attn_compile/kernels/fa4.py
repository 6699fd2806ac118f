"""FlashAttention-4 (``pip install flash-attn-4``, module ``flash_attn.cute``) as a second
block-sparse kernel, fed from our tables.

FA4's forward takes block sparsity as ``BlockSparseTensorsTorch``: per (batch, head, query
block) a count and a list of KV block indices, once for "mask" blocks (a ``mask_mod`` runs
inside them) and once for "full" blocks (no ``mask_mod``). Our blocks are all full: the mask
lists are empty and the full lists hold the kept blocks of the level the timestep selects.
:func:`fa4_block_sparse_tensors` builds them from the op's arguments with torch ops on the
tensors' device: no ``.item()``, fixed shapes (each list padded to ``max_blocks``), so it runs
inside ``torch.compile(fullgraph=True)`` and CUDA-graph capture.

Facts from FA4 4.0.0b36's source that this relies on (``flash_attn/cute``):

* sm90 with head_dim 128 uses 128 x 128 tiles (``_tile_size_fwd_sm90``), so a sparse block is
  one tile; ``block_size=(128, 128)`` is passed so FA4 need not infer it from S.
* A tile visits its list from the last entry to the first and applies the sequence-length mask
  only to the first block it visits (``consume_block_sparse_loads``), so the lists must ascend:
  then the partial last KV block (S = 32,760 at Wan 1.3B/480p is 255 blocks and 120 tokens),
  when kept, is the one masked.
* Only entries ``[0, count)`` of a list are read, so padding past the count is never used, and
  the list may be shorter than the number of KV blocks ("compact indices").
* On sm100 (B200) FA4 runs two 128-row query tiles per CTA (``q_stage=2``) when S > 128 and
  then requires sparse query blocks of 256 rows; our masks are per 128 rows, so the block-sparse
  path is sm90 only (:func:`fa4_available`); dense FA4 runs on both.

Semantics are the op's (:mod:`scaling_attn_compile.contract.reference`): levels clamped, bits
past the last block ignored, the diagonal always kept.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..contract.masks import BLOCK, num_blocks
from ..contract.reference import block_masks_for
from .block_sparse_attention import bsa_select_level
from .launch import _pow2

FA4_SPARSE_ARCHS = (9,)  # compute-capability majors where 128-row sparse query blocks work
FA4_DENSE_ARCHS = (9, 10)  # sm90 (H100/H200) and sm100 (B200) have FA4 forward kernels


@functools.cache
def _fa4_imports() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception:  # not installed, or its CUDA libraries do not load here
        return False
    return True


def fa4_available(device=None, *, block_sparse: bool = True) -> bool:
    """Whether FA4 can run here: ``flash_attn.cute`` imports and ``device`` (default: the
    current CUDA device) is sm90 (block-sparse) or sm90/sm100 (``block_sparse=False``)."""
    if not torch.cuda.is_available() or not _fa4_imports():
        return False
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else \
        torch.device(device)
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major in (FA4_SPARSE_ARCHS if block_sparse else FA4_DENSE_ARCHS)


def max_row_blocks(masks: torch.Tensor, seq_len: int) -> int:
    """The most KV blocks any row of any level keeps (diagonal included): the list length
    that fits every timestep. Reads the tables on the host once (a sync): call it when the
    tables are bound, not per step."""
    nb = num_blocks(seq_len)
    heads, levels = masks.shape[:2]
    table = torch.arange(levels, dtype=torch.int32, device=masks.device)[:, None].expand(
        levels, heads).contiguous()
    bounds = torch.arange(1, levels, dtype=torch.float32, device=masks.device)
    # One bucket per level: timestep t = l selects level l for every head.
    blocks = block_masks_for(masks, table, bounds,
                             torch.arange(levels, dtype=torch.float32, device=masks.device),
                             levels, seq_len)  # (levels, H, NB, NB)
    return int(blocks.sum(-1).max().item()) if blocks.numel() else nb


def fa4_block_sparse_tensors(masks: torch.Tensor, level_table: torch.Tensor,
                             bucket_bounds: torch.Tensor, timestep: torch.Tensor, batch: int,
                             seq_len: int, max_blocks: int | None = None, *,
                             impl: str | None = None):
    """Our tables -> FA4's block-sparse lists, on the tables' device, without a host sync.

    Returns ``(full_cnt, full_idx, mask_cnt, mask_idx)``, int32: ``full_cnt (B, H, NB)`` the
    kept blocks per query-block row of the level ``timestep`` selects, diagonal included;
    ``full_idx (B, H, NB, K)`` their indices ascending in ``[0, full_cnt)``, zeros after;
    ``mask_cnt`` zeros ``(B, H, NB)`` and ``mask_idx`` zeros ``(B, H, NB, 1)`` (no partial
    blocks). ``K = max_blocks`` (default NB, which fits any table; :func:`max_row_blocks` gives
    the least K that fits these tables). A smaller K than a row needs drops that row's highest
    blocks (the count is clamped so FA4 never reads past the list).

    ``impl``: ``"triton"`` (:func:`_fa4_lists_kernel`, one launch; the default on CUDA) or
    ``"torch"`` (the default elsewhere, and the spec the kernel is tested against). The torch
    form is ~25 small ops: on the H100 (2026-12-05) building the lists took 0.52-0.82 ms per
    call with the GPU idle, as long as FA4's own kernel at density 0.05 (0.59 ms, 1.3B shape).
    """
    nb = num_blocks(seq_len)
    k = nb if max_blocks is None else int(max_blocks)
    if not 1 <= k <= nb:
        raise ValueError(f"fa4_block_sparse_tensors: max_blocks must be in [1, NB={nb}] for "
                         f"S={seq_len}, got {max_blocks}; pass None for NB")
    impl = impl or ("triton" if masks.is_cuda else "torch")
    if impl == "triton":
        return _fa4_lists_triton(masks, level_table, bucket_bounds, timestep, batch, seq_len, k)
    if impl != "torch":
        raise ValueError(f"fa4_block_sparse_tensors: impl must be 'triton' or 'torch', got {impl!r}")
    blocks = block_masks_for(masks, level_table, bucket_bounds, timestep, batch, seq_len)
    dev = blocks.device
    cnt = blocks.sum(-1, dtype=torch.int32)  # (B, H, NB)
    pos = blocks.cumsum(-1, dtype=torch.int32) - 1  # a kept block's place in its row's list
    # Dropped blocks (and kept ones past K) go to a spare column K, cut off afterwards.
    target = torch.where(blocks & (pos < k), pos, k).long()
    cols = torch.arange(nb, dtype=torch.int32, device=dev).expand_as(target)
    idx = torch.zeros(*blocks.shape[:3], k + 1, dtype=torch.int32, device=dev)
    idx.scatter_(-1, target, cols)
    full_idx = idx[..., :k].contiguous()
    full_cnt = cnt.clamp(max=k)
    mask_cnt = torch.zeros_like(full_cnt)
    mask_idx = torch.zeros(*blocks.shape[:3], 1, dtype=torch.int32, device=dev)
    return full_cnt, full_idx, mask_cnt, mask_idx


@triton.jit
def _fa4_lists_kernel(MASKS, LEVEL_TABLE, BOUNDS, TS, CNT, IDX,
                      stride_mh, stride_ml, stride_mu, stride_mw, stride_lt_t, stride_lt_h,
                      stride_ts, num_levels, num_words, num_heads, NB, K,
                      NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr, NB_P2: tl.constexpr):
    """One (query block, head, batch element) row: the kept blocks of the level the timestep
    selects (clamped), bits past NB dropped, the diagonal on; their indices ascending at
    ``IDX[row, :K]``, zeros after; the count (clamped to K) at ``CNT[row]``. The place of each
    kept block in the list is the running count of kept blocks before it (a prefix sum)."""
    qblock, off_h, off_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    level = bsa_select_level(TS, stride_ts, BOUNDS, LEVEL_TABLE, stride_lt_t, stride_lt_h,
                             off_b, off_h, num_levels, NUM_BOUNDS, BOUNDS_P2)
    cols = tl.arange(0, NB_P2)
    word_of = cols // 32
    row = MASKS + off_h * stride_mh + level * stride_ml + qblock * stride_mu
    words = tl.load(row + word_of * stride_mw, mask=(cols < NB) & (word_of < num_words), other=0)
    bits = (words.to(tl.uint32, bitcast=True) >> (cols % 32).to(tl.uint32)) & 1
    keep = ((bits != 0) | (cols == qblock)) & (cols < NB)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    count = tl.sum(keep.to(tl.int32), axis=0)
    out_row = (off_b * num_heads + off_h) * NB + qblock
    tl.store(CNT + out_row, tl.minimum(count, K))
    tl.store(IDX + out_row * K + pos, cols, mask=keep & (pos < K))
    tl.store(IDX + out_row * K + cols, tl.zeros([NB_P2], tl.int32),
             mask=(cols >= count) & (cols < K))  # never a place the line above writes


def _fa4_lists_triton(masks, level_table, bucket_bounds, timestep, batch, seq_len, k):
    """:func:`fa4_block_sparse_tensors` in one kernel launch (on the tables' device; the Triton
    interpreter runs it on the CPU)."""
    nb = num_blocks(seq_len)
    heads = masks.shape[0]  # the caller passes masks[:H] and level_table[:, :H]
    dev = masks.device
    full_cnt = torch.empty(batch, heads, nb, dtype=torch.int32, device=dev)
    full_idx = torch.empty(batch, heads, nb, k, dtype=torch.int32, device=dev)
    ts = timestep.reshape(-1).to(device=dev, dtype=torch.float32)
    bounds = bucket_bounds.to(device=dev, dtype=torch.float32).contiguous()
    nbounds = bounds.numel()
    _fa4_lists_kernel[(nb, heads, batch)](
        masks, level_table, bounds, ts, full_cnt, full_idx, *masks.stride(),
        *level_table.stride(), 0 if ts.numel() == 1 else ts.stride(0), masks.shape[1],
        masks.shape[3], heads, nb, k, NUM_BOUNDS=nbounds,
        BOUNDS_P2=_pow2(nbounds), NB_P2=_pow2(nb))
    mask_cnt = torch.zeros_like(full_cnt)
    mask_idx = torch.zeros(batch, heads, nb, 1, dtype=torch.int32, device=dev)
    return full_cnt, full_idx, mask_cnt, mask_idx


def _check(q, k, v):
    def need(cond, msg):
        if not cond:
            raise ValueError(f"fa4_block_sparse_attention: {msg}")

    need(q.dim() == 4, f"q must be (B, H, S, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        need(t.shape == q.shape, f"{name} must have q's shape {tuple(q.shape)}, got "
                                 f"{tuple(t.shape)}; self-attention only")
    need(q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype == v.dtype,
         f"q, k, v must be one of float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}; "
         "cast them, or use the op (which runs float32 on the CPU)")
    # sm90 keeps a 128-wide KV tile only up to head_dim 128 (112 and 80 above), and a sparse
    # block must be whole tiles (_tile_size_fwd_sm90, normalize_block_sparse_config).
    need(q.shape[-1] <= 128 and q.shape[-1] % 8 == 0,
         f"head_dim must be a multiple of 8 up to 128 for 128-token sparse blocks, got "
         f"{q.shape[-1]}; use the op's Triton kernel")
    need(q.is_cuda, f"q must be on a CUDA device, got {q.device}; FA4 has no CPU path")
    need(fa4_available(q.device),
         "FA4 block-sparse needs flash_attn.cute (pip install 'scaling-attn-compile[fa4]') and an "
         f"sm90 GPU, got {torch.cuda.get_device_name(q.device)} "
         f"(import {'ok' if _fa4_imports() else 'failed'}); use the op's Triton kernel instead")


def fa4_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               masks: torch.Tensor, level_table: torch.Tensor,
                               bucket_bounds: torch.Tensor, timestep: torch.Tensor,
                               scale: float, *, max_blocks: int | None = None) -> torch.Tensor:
    """The op's semantics through FA4's block-sparse forward (sm90).

    Arguments as ``torch.ops.scaling_attn.sparse_attention`` (q/k/v ``(B, H, S, D)``, any
    strides with a contiguous last dim; one layer's tables; ``timestep (B,)`` or ``()``).
    Returns ``(B, H, S, D)``: a view of FA4's ``(B, S, H, D)`` output, which has q's strides
    when q is the ``(B, H, S, D)`` view of ``(B, S, H, D)`` memory that diffusers passes.
    """
    _check(q, k, v)
    B, H, S, _ = q.shape
    lists = fa4_block_sparse_tensors(masks[:H], level_table[:, :H], bucket_bounds, timestep,
                                     B, S, max_blocks)
    return fa4_forward(q, k, v, scale, lists)


def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                lists: tuple | None = None) -> torch.Tensor:
    """FA4's forward on ``(B, H, S, D)`` q/k/v: dense (``lists`` None; sm90 or sm100), or
    block-sparse from :func:`fa4_block_sparse_tensors`'s ``lists`` (sm90). No input checks:
    :func:`fa4_block_sparse_attention` is the checked entry; benchmarks call this to time the
    kernel without the list building."""
    from flash_attn.cute import flash_attn_func

    sparse = None
    if lists is not None:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        full_cnt, full_idx, mask_cnt, mask_idx = lists
        sparse = BlockSparseTensorsTorch(mask_block_cnt=mask_cnt, mask_block_idx=mask_idx,
                                         full_block_cnt=full_cnt, full_block_idx=full_idx,
                                         block_size=(BLOCK, BLOCK))
    out, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             softmax_scale=scale, block_sparse_tensors=sparse)
    return out.transpose(1, 2)
