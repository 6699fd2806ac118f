"""Video metrics of a sparse run against the dense one of the same prompt and seed: PSNR (data
range 2, videos in ``[-1, 1]``), SSIM (Gaussian window 11 / sigma 1.5 per frame and channel,
averaged over frames) and relative L2 ``||s - d|| / ||d||``. Used by the demo, the quality study
and the benchmarks."""

from __future__ import annotations

import math


def _gaussian_window(size: int, sigma: float):
    import torch

    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_video(a, b, *, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two videos ``(C, F, H, W)`` (or ``(B, C, F, H, W)``): Gaussian-window SSIM
    (Wang et al. 2004, K1 = 0.01, K2 = 0.03) of each frame, channels treated separately, valid
    windows only, averaged over frames and channels. The window shrinks (odd) to fit small frames."""
    import torch.nn.functional as F

    a, b = a.double(), b.double()
    if a.dim() == 4:
        a, b = a[None], b[None]
    B, C, T, H, W = a.shape
    size = min(window, H - (H + 1) % 2, W - (W + 1) % 2)
    w = _gaussian_window(size, sigma)[None, None].to(a.device)
    x = a.permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)
    y = b.permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx * mx
    syy = F.conv2d(y * y, w) - my * my
    sxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def psnr(a, b, data_range: float = 2.0) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def rel_l2(a, b) -> float:
    """``||a - b|| / ||b||`` (b the reference)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def video_metrics(sparse, dense) -> dict:
    """PSNR (dB), SSIM and relative L2 of one video against its dense reference (same shape)."""
    return {"psnr_db": psnr(sparse, dense), "ssim": ssim_video(sparse, dense),
            "rel_l2": rel_l2(sparse, dense)}
