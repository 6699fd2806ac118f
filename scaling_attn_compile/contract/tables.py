"""Materialised tables: what the backend binds to a model for one latent grid.

A plan (WEST topology + FAST schedule, :mod:`scaling_attn_compile.plan`) is resolution-free;
``plan.materialize(grid)`` turns it into :class:`AttentionTables` for one latent grid
``(F, H, W)`` (after patching). The backend only ever sees these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .masks import BLOCK, add_diagonal, num_blocks, pack_blocks, unpack_blocks


@dataclass
class AttentionTables:
    """Per-layer op inputs for one latent grid.

    Attributes:
        grid: latent token grid ``(F, H, W)`` after patching; ``S = F * H * W``.
        masks: per layer, int32 ``(H, L, NB, W)`` bit-packed block masks.
        level_tables: per layer, int32 ``(NT, H)``.
        bucket_bounds: float32 ``(NT - 1,)``, ascending timestep boundaries (shared by layers).
        level_densities: per layer, float ``(H, L)`` kept-block fraction of each level (for logs).
        token_order: which tokens share a 128-token block (``token_order.py`` spec: ``"raster"``,
            ``"tile"``, ``"tile:FxHxW"``); the backend permutes the model's tokens to match.
        text_len: text tokens after the video tokens in a joint sequence ``[video | text]``
            (HunyuanVideo; :func:`joint_tables`); 0 for video-only self-attention.
    """

    grid: tuple[int, int, int]
    masks: list[torch.Tensor]
    level_tables: list[torch.Tensor]
    bucket_bounds: torch.Tensor
    level_densities: list[torch.Tensor] | None = None
    token_order: str = "raster"
    text_len: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.masks)

    @property
    def num_heads(self) -> int:
        return self.masks[0].shape[0]

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid) + self.text_len

    def to(self, device) -> AttentionTables:
        return AttentionTables(
            self.grid,
            [m.to(device) for m in self.masks],
            [t.to(device) for t in self.level_tables],
            self.bucket_bounds.to(device),
            self.level_densities,
            self.token_order,
            self.text_len,
        )

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(masks, level_table, bucket_bounds)`` of layer ``i``, in the op's argument order."""
        return self.masks[i], self.level_tables[i], self.bucket_bounds

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.masks, *self.level_tables])


def uniform_tables(num_layers: int, num_heads: int, grid: tuple[int, int, int], density: float,
                   *, seed: int = 0, pattern: str = "random") -> AttentionTables:
    """Tables with one level per layer at ``density`` kept blocks, for benchmarks and tests.

    ``pattern="random"`` keeps a random ``density`` fraction of each query-block row (plus the
    diagonal); ``"local"`` keeps the nearest blocks to the diagonal (a band). Density 1.0 is
    all blocks.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"uniform_tables: density must be in (0, 1], got {density}")
    s = math.prod(grid)
    nb = num_blocks(s)
    keep = max(1, round(density * nb))
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(num_layers):
        if pattern == "random":
            score = torch.rand(num_heads, nb, nb, generator=g)
        elif pattern == "local":
            idx = torch.arange(nb)
            score = -(idx[:, None] - idx[None, :]).abs().float().expand(num_heads, nb, nb)
        else:
            raise ValueError(f"uniform_tables: pattern must be 'random' or 'local', got {pattern!r}")
        score = score + 2.0 * torch.eye(nb)  # the diagonal is always among the kept blocks
        top = score.topk(keep, dim=-1).indices
        block = torch.zeros(num_heads, nb, nb, dtype=torch.bool).scatter_(-1, top, True)
        masks.append(pack_blocks(add_diagonal(block))[:, None])  # (H, 1, NB, W)
    return AttentionTables(
        grid=tuple(grid),
        masks=masks,
        level_tables=[torch.zeros(1, num_heads, dtype=torch.int32) for _ in range(num_layers)],
        bucket_bounds=torch.zeros(0, dtype=torch.float32),
    )


def joint_block_mask(video_blocks: torch.Tensor, video_len: int, text_len: int) -> torch.Tensor:
    """Block mask of a joint sequence ``[video (video_len) | text (text_len)]`` from the video's.

    ``video_blocks`` is boolean ``(..., NBv, NBv)`` over the video tokens alone
    (``NBv = ceil(video_len / 128)``). A 128-token block is *video* when all its tokens are
    video (``u < video_len // 128``); every other block holds text tokens (all text, or the one
    block that straddles the boundary when ``video_len % 128 != 0``). Video x video blocks are
    the video mask's; a block pair with a text-holding block on either side is kept, so text
    rows and text columns stay dense. Returns ``(..., NB, NB)``, ``NB = ceil(S / 128)``.
    """
    nbv = num_blocks(video_len)
    if video_blocks.shape[-2:] != (nbv, nbv):
        raise ValueError(f"joint_block_mask: video_blocks must be (..., {nbv}, {nbv}) for "
                         f"video_len={video_len}, got {tuple(video_blocks.shape)}")
    if text_len < 0:
        raise ValueError(f"joint_block_mask: text_len must be >= 0, got {text_len}")
    nb = num_blocks(video_len + text_len)
    pure = video_len // BLOCK  # blocks of video tokens only
    out = torch.ones(*video_blocks.shape[:-2], nb, nb, dtype=torch.bool,
                     device=video_blocks.device)
    out[..., :pure, :pure] = video_blocks[..., :pure, :pure]
    return out


def joint_tables(video: AttentionTables, text_len: int) -> AttentionTables:
    """Tables for the joint sequence ``[video | text]`` (HunyuanVideo's attention) from the
    video tables of a plan (``plan.materialize(grid)``): every level's mask through
    :func:`joint_block_mask`; level tables and bucket bounds unchanged; densities recounted.

    The video tokens must sit at ``[0, prod(grid))`` in the plan's token order and the text
    after them; the straddling block is dense, so ``prod(grid)`` need not be a multiple of 128.
    """
    if video.text_len:
        raise ValueError(f"joint_tables: video tables already hold {video.text_len} text tokens; "
                         "pass the plan's video tables (plan.materialize(grid))")
    s_v = math.prod(video.grid)
    nbv = num_blocks(s_v)
    masks, dens = [], []
    for m in video.masks:
        blocks = joint_block_mask(add_diagonal(unpack_blocks(m, nbv)), s_v, text_len)
        masks.append(pack_blocks(blocks))
        dens.append(blocks.float().mean((-2, -1)))
    return AttentionTables(tuple(video.grid), masks, [t.clone() for t in video.level_tables],
                           video.bucket_bounds.clone(), dens, video.token_order, int(text_len))
