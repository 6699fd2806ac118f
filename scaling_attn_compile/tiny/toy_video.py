"""Procedural toy videos with captions, for training and studying the tiny video DiT.

Each video is one textured shape (square, circle or triangle) that moves left/right/up/down,
bounces or rotates over a textured background that pans; its caption comes from a small grammar:

    caption := [size] color shape motion
    size    := "small" | "large"                      (optional)
    color   := red | green | blue | yellow | purple | cyan | orange | white
    shape   := square | circle | triangle
    motion  := "moving left" | "moving right" | "moving up" | "moving down" | "bouncing" | "rotating"

e.g. ``"red square moving left"``, ``"small blue circle bouncing"``, ``"green triangle rotating"``.

Videos are ``(C, F, H, W)`` = ``(3, frames, height, width)`` float tensors in ``[-1, 1]``; a batch is
``(B, 3, F, H, W)``, the layout of Wan's ``hidden_states``. Any grid works (the shape's size and
speed are fractions of ``min(H, W)``, so a caption looks the same at 32x32 and 32x64).

Determinism: all random choices are drawn on the CPU from ``torch.Generator(seed)``; rendering is
plain tensor arithmetic on the chosen device (one batched pass, cheap on a GPU, so training never
waits on data). Same seed and device -> same bits; across devices, equal up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.12),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.15, 0.30, 0.98),
    "yellow": (0.98, 0.90, 0.15),
    "purple": (0.65, 0.20, 0.90),
    "cyan": (0.15, 0.90, 0.92),
    "orange": (0.98, 0.55, 0.10),
    "white": (0.98, 0.98, 0.98),
}
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "rotating")
SIZES = ("small", "large")

# Radius of the shape as a fraction of min(H, W): "small", unnamed (medium), "large".
_RADIUS = {"small": (0.10, 0.14), None: (0.15, 0.20), "large": (0.22, 0.27)}

# (color, shape, motion) triples never used in training: held-out prompts for evaluation. Each of
# their words appears in training in other combinations, so they test composition, not vocabulary.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "rotating"),
    ("blue", "triangle", "moving left"),
    ("green", "square", "bouncing"),
    ("yellow", "circle", "moving up"),
    ("purple", "square", "moving right"),
    ("cyan", "triangle", "bouncing"),
    ("orange", "triangle", "rotating"),
    ("white", "circle", "moving down"),
)

VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*SIZES, *COLORS, *SHAPES, *(w for m in MOTIONS for w in m.split())]
    )
)
"""Every word a caption can contain, in a fixed order (the caption encoder's vocabulary)."""


@dataclass(frozen=True)
class VideoSpec:
    """What one video shows; everything but the caption words is drawn at random."""

    color: str
    shape: str
    motion: str
    size: str | None  # None: medium, and the caption names no size
    radius: float  # fraction of min(H, W)
    pos: tuple[float, float]  # start centre (x, y), fractions of (W, H)
    vel: tuple[float, float]  # (x, y) per frame, fraction of min(H, W)
    angle: float  # start angle, radians
    spin: float  # radians per frame (nonzero only for "rotating")
    bounce_period: float  # frames per bounce (for "bouncing")
    stripe_freq: float  # stripes per radius on the shape's texture
    stripe_phase: float
    bg_tint: tuple[float, float, float]
    bg_freqs: tuple[tuple[float, float], ...]  # 3 gratings, cycles per min(H, W) in (x, y)
    bg_phases: tuple[float, float, float]
    bg_vel: tuple[float, float]  # background pan, fraction of min(H, W) per frame

    @property
    def caption(self) -> str:
        words = ([self.size] if self.size else []) + [self.color, self.shape, self.motion]
        return " ".join(words)


def all_triples() -> list[tuple[str, str, str]]:
    """All (color, shape, motion) triples, held-out ones included: 8 x 3 x 6 = 144."""
    return [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS]


def train_triples() -> list[tuple[str, str, str]]:
    """The triples training draws from (all but ``HELD_OUT``)."""
    held = set(HELD_OUT)
    return [t for t in all_triples() if t not in held]


def held_out_captions() -> list[str]:
    """One caption per held-out triple, e.g. ``"red circle rotating"``."""
    return [f"{c} {s} {m}" for c, s, m in HELD_OUT]


def parse_caption(caption: str) -> tuple[str | None, str, str, str]:
    """``"small red square moving left"`` -> ``("small", "red", "square", "moving left")``."""
    words = caption.lower().split()
    size = words.pop(0) if words and words[0] in SIZES else None
    if len(words) < 3 or words[0] not in COLORS or words[1] not in SHAPES:
        raise ValueError(
            f"caption {caption!r}: expected '[size] color shape motion' with color in "
            f"{list(COLORS)}, shape in {list(SHAPES)}; got {words!r}"
        )
    motion = " ".join(words[2:])
    if motion not in MOTIONS:
        raise ValueError(f"caption {caption!r}: motion {motion!r} is not one of {list(MOTIONS)}")
    return size, words[0], words[1], motion


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _choice(g: torch.Generator, seq):
    return seq[int(torch.randint(len(seq), (), generator=g))]


def sample_spec(g: torch.Generator, caption: str | None = None, *, held_out: bool = False,
                frames: int = 8) -> VideoSpec:
    """Draw one video's parameters from ``g``.

    ``caption`` fixes the words (the rest stays random); else the triple is drawn from
    ``train_triples()`` (or from ``HELD_OUT`` with ``held_out=True``) and a size word is named
    half of the time. ``frames`` only bounds the speeds, so the shape stays in view.
    """
    if caption is None:
        color, shape, motion = _choice(g, HELD_OUT if held_out else train_triples())
        size = _choice(g, SIZES) if torch.rand((), generator=g).item() < 0.5 else None
    else:
        size, color, shape, motion = parse_caption(caption)
    r = _u(g, *_RADIUS[size])
    angle = _u(g, 0.0, 2 * math.pi)
    spin = 0.0
    period = 1.0
    lo, hi = r + 0.02, 1.0 - r - 0.02  # centre range that keeps the shape in view (of min side)
    travel = max(hi - lo, 0.05)
    n = max(frames - 1, 1)
    if motion.startswith("moving"):
        # Cover 40-90% of the free range over the clip, in the named direction.
        speed = _u(g, 0.4, 0.9) * travel / n
        d = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion.split()[1]]
        vel = (d[0] * speed, d[1] * speed)
        # Start on the side the shape moves away from; the cross-axis is free.
        start_along = lo + _u(g, 0.0, travel - speed * n)
        cross = _u(g, lo, hi)
        along = start_along if (d[0] + d[1]) > 0 else 1.0 - start_along
        pos = (along, cross) if d[0] != 0 else (cross, along)
    elif motion == "bouncing":
        # Ballistic hops on a floor with a sideways drift; period 3-6 frames so 8 frames show a bounce.
        vel = (_choice(g, (-1, 1)) * _u(g, 0.01, 0.04), 0.0)
        pos = (_u(g, lo, hi), _u(g, 0.0, 1.0))  # y: phase of the hop, in [0, 1)
        period = _u(g, 3.0, 6.0)
    else:  # rotating: stays put, turns 0.2-0.45 rad per frame either way
        vel = (0.0, 0.0)
        pos = (_u(g, lo, hi), _u(g, lo, hi))
        spin = _choice(g, (-1, 1)) * _u(g, 0.2, 0.45)
    bg_freqs = tuple((_u(g, -3.0, 3.0), _u(g, -3.0, 3.0)) for _ in range(3))
    bg_speed = _u(g, 0.01, 0.05)
    bg_dir = _u(g, 0.0, 2 * math.pi)
    return VideoSpec(
        color=color, shape=shape, motion=motion, size=size, radius=r, pos=pos, vel=vel,
        angle=angle, spin=spin, bounce_period=period,
        stripe_freq=_u(g, 1.0, 2.5), stripe_phase=_u(g, 0.0, 2 * math.pi),
        bg_tint=(_u(g, 0.15, 0.5), _u(g, 0.15, 0.5), _u(g, 0.15, 0.5)),
        bg_freqs=bg_freqs, bg_phases=tuple(_u(g, 0.0, 2 * math.pi) for _ in range(3)),
        bg_vel=(bg_speed * math.cos(bg_dir), bg_speed * math.sin(bg_dir)),
    )


def _sdf(shape_id: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii; < 0 inside) to a unit square / circle / triangle at the origin.

    shape_id ``(B, 1, 1, 1)`` (0, 1, 2 as in ``SHAPES``); px, py ``(B, F, H, W)`` local coords.
    """
    # square (half-side 0.85 so its area is close to the circle's)
    dx, dy = px.abs() - 0.85, py.abs() - 0.85
    sq = torch.hypot(dx.clamp(min=0), dy.clamp(min=0)) + torch.maximum(dx, dy).clamp(max=0)
    ci = torch.hypot(px, py) - 1.0
    # equilateral triangle of circumradius 1.2 (Quilez's exact SDF), pointing up on screen
    k = math.sqrt(3.0)
    rt = 1.2 * k / 2  # half side
    x = px.abs() - rt
    y = py + rt / k  # image rows grow downwards, so +py puts the apex at the top
    flip = (x + k * y) > 0
    x, y = torch.where(flip, (x - k * y) / 2, x), torch.where(flip, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * rt, 0.0)
    tr = -torch.hypot(x, y) * torch.sign(y)
    return torch.where(shape_id == 0, sq, torch.where(shape_id == 1, ci, tr))


def render(specs: list[VideoSpec], grid: tuple[int, int, int], device="cpu",
           dtype=torch.float32) -> torch.Tensor:
    """Render ``specs`` at ``grid = (F, H, W)`` pixels -> ``(B, 3, F, H, W)`` in ``[-1, 1]``."""
    F, H, W = grid
    if min(grid) < 1:
        raise ValueError(f"grid: expected (F, H, W) >= 1, got {grid}")
    B = len(specs)
    m = float(min(H, W))

    # All per-video numbers go to the device in one copy (one host->device transfer per batch).
    fields = {
        "bg_vx": [s.bg_vel[0] for s in specs], "bg_vy": [s.bg_vel[1] for s in specs],
        **{f"f{i}{a}": [s.bg_freqs[i][j] for s in specs] for i in range(3) for j, a in enumerate("xy")},
        **{f"ph{i}": [s.bg_phases[i] for s in specs] for i in range(3)},
        **{f"tint{c}": [s.bg_tint[c] for s in specs] for c in range(3)},
        **{f"rgb{c}": [COLORS[s.color][c] for s in specs] for c in range(3)},
        "x0": [s.pos[0] for s in specs], "y0": [s.pos[1] for s in specs],
        "vx": [s.vel[0] for s in specs], "vy": [s.vel[1] for s in specs],
        "r": [s.radius for s in specs], "bounce": [float(s.motion == "bouncing") for s in specs],
        "period": [s.bounce_period for s in specs], "angle": [s.angle for s in specs],
        "spin": [s.spin for s in specs], "shape": [float(SHAPES.index(s.shape)) for s in specs],
        "stripe_f": [s.stripe_freq for s in specs], "stripe_ph": [s.stripe_phase for s in specs],
    }
    names = list(fields)
    table = torch.tensor([fields[k] for k in names], dtype=torch.float32).to(device)  # (K, B)

    def col(name):  # -> (B, 1, 1, 1) on device
        return table[names.index(name)].view(B, 1, 1, 1)

    t = torch.arange(F, dtype=torch.float32, device=device).view(1, F, 1, 1)
    ys = (torch.arange(H, dtype=torch.float32, device=device) + 0.5).view(1, 1, H, 1)
    xs = (torch.arange(W, dtype=torch.float32, device=device) + 0.5).view(1, 1, 1, W)

    # Background: 3 colour gratings in min-side units, panned by bg_vel per frame.
    bx = xs / m - col("bg_vx") * t
    by = ys / m - col("bg_vy") * t
    waves = [
        torch.sin(2 * math.pi * (col(f"f{i}x") * bx + col(f"f{i}y") * by) + col(f"ph{i}"))
        for i in range(3)
    ]
    # Channel c leans on grating c, so the texture is coloured, not gray: (B, 3, F, H, W).
    bg_rgb = torch.stack(
        [col(f"tint{c}") * (1 + 0.6 * (waves[0] + waves[1] + waves[2] + waves[c]) / 4) for c in range(3)],
        dim=1,
    )

    # Shape centre per frame, in min-side units.
    r = col("r")
    is_bounce = col("bounce")
    # Linear motion (moving / bouncing drift); bouncing shapes are mirrored at the side walls.
    cx = col("x0") * (W / m) + col("vx") * t
    lo, hi = r + 0.02, W / m - r - 0.02
    span = (hi - lo).clamp(min=1e-3)
    u = torch.remainder(cx - lo, 2 * span)
    cx = torch.where(is_bounce > 0, lo + span - (u - span).abs(), cx)
    cy = col("y0") * (H / m) + col("vy") * t
    # Bouncing: |sin| hop from the floor, height 45% of the free vertical range.
    floor = H / m - r - 0.02
    hop = (torch.sin(math.pi * (t / col("period") + col("y0")))).abs() * 0.45 * (H / m - 2 * r - 0.04).clamp(min=0)
    cy = torch.where(is_bounce > 0, floor - hop, cy)
    ang = col("angle") + col("spin") * t

    # Local (rotated, radius-normalised) coordinates of every pixel.
    dx = (xs / m - cx) / r
    dy = (ys / m - cy) / r
    ca, sa = torch.cos(ang), torch.sin(ang)
    px = ca * dx + sa * dy
    py = -sa * dx + ca * dy
    shape_id = col("shape")
    d = _sdf(shape_id, px, py)  # (B, F, H, W), radii
    # ~1 pixel anti-aliased edge: distance in pixels = d * r * m.
    alpha = torch.sigmoid(-d * r * m * 2.0).unsqueeze(1)
    # Stripes in the shape's own frame: they turn with it (that is what shows a circle rotating).
    stripes = 0.5 + 0.5 * torch.cos(
        2 * math.pi * col("stripe_f") * px + col("stripe_ph")
    )
    shade = (0.65 + 0.35 * stripes).unsqueeze(1)
    fg = torch.stack([col(f"rgb{c}") for c in range(3)], dim=1) * shade  # (B, 3, F, H, W)
    video = alpha * fg + (1 - alpha) * bg_rgb
    return (video.clamp(0, 1) * 2 - 1).to(dtype)


def sample_batch(seed: int, n: int, grid: tuple[int, int, int], device="cpu", *,
                 captions: list[str] | None = None, held_out: bool = False,
                 dtype=torch.float32) -> tuple[torch.Tensor, list[str]]:
    """``n`` videos and captions, deterministic in ``seed``: ``((n, 3, F, H, W), [n captions])``.

    ``captions`` (length n) fixes the words; else they are drawn (training triples, or held-out
    ones with ``held_out=True``).
    """
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions: expected {n} captions, got {len(captions)}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    specs = [
        sample_spec(g, None if captions is None else captions[i], held_out=held_out, frames=grid[0])
        for i in range(n)
    ]
    return render(specs, grid, device=device, dtype=dtype), [s.caption for s in specs]


def sample_video(seed: int, grid: tuple[int, int, int] = (8, 32, 32), caption: str | None = None,
                 device="cpu") -> tuple[torch.Tensor, str]:
    """One video ``(3, F, H, W)`` in ``[-1, 1]`` and its caption, deterministic in ``seed``."""
    video, caps = sample_batch(seed, 1, grid, device,
                               captions=None if caption is None else [caption])
    return video[0], caps[0]
