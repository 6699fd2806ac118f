"""Pictures of a plan: a layer's per-head threshold maps T and the block mask at one density,
the FAST schedule, and the token order's block layout (which tokens a block row/column is)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from . import topology


def plot_layer(plan, layer: int, out, *, density: float = 0.3, grid=None,
               heads: Sequence[int] | None = None, max_cols: int = 8, dpi: int = 110) -> Path:
    """Write a PNG grid for ``layer``: per head, T (``(NB, NB)``, query block rows, KV block
    columns; dark = kept at low density) above the mask ``T <= density`` (white = kept).

    ``grid``: latent token grid ``(F, H, W)`` to remap to first (default: the calibration grid).
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    if not 0 <= layer < plan.num_layers:
        raise ValueError(f"plot_layer: layer must be in 0..{plan.num_layers - 1}, got {layer}")
    heads = list(range(plan.num_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < plan.num_heads]
    if bad or not heads:
        raise ValueError(f"plot_layer: heads must be a non-empty subset of 0..{plan.num_heads - 1}, "
                         f"got {heads}")
    codes = plan.thresholds(grid)[layer]  # (H, NB, NB)
    t = topology.codes_to_thresholds(codes).cpu().numpy()
    mask = topology.mask_at(codes, density).cpu().numpy()
    nb = codes.shape[-1]
    cols = min(max_cols, len(heads))
    groups = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(2 * groups, cols, figsize=(max(5.0, 2.2 * cols), 4.6 * groups), squeeze=False)
    image = None
    for i, h in enumerate(heads):
        r, c = 2 * (i // cols), i % cols
        image = axes[r][c].imshow(t[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[r][c].set_title(f"head {h}: T", fontsize=8)
        d = float(mask[h].mean())
        axes[r + 1][c].imshow(mask[h], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r + 1][c].set_title(f"T <= {density:g}: {d:.0%} kept", fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for i in range(len(heads), groups * cols):  # empty cells of the last group
        axes[2 * (i // cols)][i % cols].axis("off")
        axes[2 * (i // cols) + 1][i % cols].axis("off")
    shown = tuple(plan.calib_grid if grid is None else grid)
    order = getattr(plan, "token_order", "raster")
    fig.suptitle(f"layer {layer}: WEST threshold maps, grid (F, H, W) = {shown}, NB = {nb}\n"
                 f"rows: query blocks, columns: KV blocks, in {order} order "
                 f"(see plot_block_layout); masks: white = kept, black = dropped", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="T (keep-density threshold)")
    return _save(fig, out, dpi)


def plot_block_layout(grid, order, out, *, frames: Sequence[int] | None = None,
                      dpi: int = 110) -> Path:
    """Write a PNG of which 128-token block each token of ``grid (F, H, W)`` belongs to under
    ``order`` (``token_order.py``), one panel per frame in ``frames`` (default: up to 4): what
    the rows and columns of :func:`plot_layer`'s maps are. Raster blocks are strips of token
    rows; tile blocks are boxes (the block id is the colour, its number is printed on it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..contract.token_order import TokenOrder, block_of_token, describe

    F, H, W = (int(x) for x in grid)
    order = TokenOrder.parse(order)
    blk = block_of_token((F, H, W), order).view(F, H, W)
    frames = list(range(min(F, 4))) if frames is None else [f for f in frames if 0 <= f < F]
    if not frames:
        raise ValueError(f"plot_block_layout: frames must be in 0..{F - 1}, got none")
    fig, axes = plt.subplots(1, len(frames), figsize=(3.2 * len(frames), 3.2 * H / W + 0.9),
                             squeeze=False)
    nb = int(blk.max()) + 1
    for ax, f in zip(axes[0], frames, strict=True):
        ax.imshow(blk[f].numpy(), cmap="tab20", vmin=0, vmax=max(19, nb - 1),
                  interpolation="nearest")
        for b in blk[f].unique().tolist():  # label each block at its tokens' centre
            ys, xs = (blk[f] == b).nonzero(as_tuple=True)
            ax.text(xs.float().mean(), ys.float().mean(), str(b), ha="center", va="center",
                    fontsize=6)
        ax.set_title(f"frame {f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"grid (F, H, W) = {(F, H, W)}: {describe((F, H, W), order)}", fontsize=8)
    return _save(fig, out, dpi)


def _save(fig, out, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``out`` (parents made) and free it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_schedule(plan, out, *, heads_per_panel: int = 4, max_cols: int = 4,
                  dpi: int = 110) -> Path:
    """Write a PNG of ``plan``'s FAST schedule: achieved density (kept blocks / all blocks,
    diagonal included, at the calibration grid) per layer (rows) and timestep bucket (columns,
    first/noisiest step on the left), averaged over each group of ``heads_per_panel`` heads,
    one panel per group. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.ticker import MaxNLocator

    sched = plan.schedule
    if sched is None:
        raise ValueError("plot_schedule: plan has no FAST schedule; build one with "
                         "`scaling-attn fast` first")
    if heads_per_panel < 1:
        raise ValueError(f"plot_schedule: heads_per_panel must be >= 1, got {heads_per_panel}")
    codes = plan.codes  # (L, H, NB, NB)
    dens = torch.stack([topology.mask_at(codes, p).double().mean(dim=(-1, -2))
                        for p in sched.levels], -1)  # (L, H, NL)
    lt = sched.level_tables.long().flip(1)  # bucket order -> step order (early steps first)
    L, T, H = lt.shape
    cell = dens[:, None].expand(L, T, H, -1).gather(-1, lt[..., None])[..., 0]  # (L, T, H)
    groups = [list(range(h, min(H, h + heads_per_panel))) for h in range(0, H, heads_per_panel)]
    cols = min(max_cols, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.0, 3.2 * cols), 2.8 * rows + 0.8),
                             squeeze=False)
    image = None
    for i, g in enumerate(groups):
        ax = axes[i // cols][i % cols]
        image = ax.imshow(cell[:, :, g].mean(-1).numpy(), cmap="magma", vmin=0.0, vmax=1.0,
                          aspect="auto", interpolation="nearest")
        ax.set_title(f"heads {g[0]}-{g[-1]}" if len(g) > 1 else f"head {g[0]}", fontsize=8)
        ax.set_xlabel("step bucket (early -> late)", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers and steps are whole
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for i in range(len(groups), rows * cols):
        axes[i // cols][i % cols].axis("off")
    info = sched.info
    fig.suptitle(f"FAST schedule ({info.get('method', 'schedule')}): global density "
                 f"{float(cell.mean()):.3f}"
                 + (f", target {info['target_density']:g}" if "target_density" in info else ""),
                 fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="achieved density")
    return _save(fig, out, dpi)
