"""Pictures of a plan: a layer's per-head threshold maps T and the block mask at one density."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from . import west


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
    t = west.codes_to_thresholds(codes).cpu().numpy()
    mask = west.mask_at(codes, density).cpu().numpy()
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
    fig.suptitle(f"layer {layer}: WEST threshold maps, grid (F, H, W) = {shown}, NB = {nb}\n"
                 f"rows: query blocks, columns: KV blocks", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="T (keep-density threshold)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
