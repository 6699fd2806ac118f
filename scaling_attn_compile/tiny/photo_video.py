"""Training video from real photographs: camera moves over the pictures scikit-image's wheel ships.

small-wan is trained on this. Nothing is downloaded and nothing large is stored: the ~20 photos
inside the ``skimage/data/`` folder of the scikit-image wheel (astronaut, coffee, chelsea the cat,
the Hubble deep field, retina, textures...) are read with Pillow (``skimage`` itself is never
imported, so ``skimage.data``'s downloader can never run) and turned into videos on the fly:

- **camera**: a window over a background photo that pans (left/right/up/down), zooms (in/out) or
  rotates (clockwise/counterclockwise), or does two of these at once; every parameter is linear
  in time, so the trajectory is smooth;
- **parallax**: a soft-edged elliptical crop of another photo floats in front and moves 1.6-2.4x
  as fast as the background (a nearer layer), plus a slow drift of its own;
- **shape** (60% of videos): a striped procedural shape from ``toy_video`` (same colours, shapes
  and SDF) moving left/right/up/down on top.

Captions name content and motion, e.g. ``"coffee photo, camera pans left, red circle moving up"``
(commas are cosmetic; the caption encoder splits on whitespace and commas).

Layout: ``(B, 3, F, H, W)`` in ``[-1, 1]``, Wan's ``hidden_states``. All random choices are drawn
on the CPU from a seeded ``torch.Generator``; rendering is one batched ``F.grid_sample`` pass on the
chosen device. Same seed and device -> same bits.

Split: the photos in ``HELD_OUT_PHOTOS`` and the compound camera motions in ``HELD_OUT_MOTIONS``
are never used in training (``held_out_prompts(n)`` gives fixed evaluation prompts from them).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .toy_video import COLORS, SHAPES, _sdf

# file -> caption word. Excluded (too small, synthetic or not a photograph): chessboard_*, color,
# horse (a silhouette), logo, microaneurysms (102 px), page, text, phantom, the multipage tifs, the
# gif, the lbpcascade xml and the npy/npz arrays.
PHOTOS: dict[str, str] = {
    "astronaut.png": "astronaut",
    "brick.png": "brick",
    "camera.png": "cameraman",
    "cell.png": "cell",
    "chelsea.png": "cat",
    "clock_motion.png": "clock",
    "coffee.png": "coffee",
    "coins.png": "coins",
    "grass.png": "grass",
    "gravel.png": "gravel",
    "hubble_deep_field.jpg": "galaxies",
    "ihc.png": "tissue",
    "moon.png": "moon",
    "motorcycle_left.png": "motorcycle",
    "motorcycle_right.png": "motorcycle",  # the stereo twin: same word, a shifted viewpoint
    "retina.jpg": "retina",
    "rocket.jpg": "rocket",
}
# Never in training, as background or foreground. One texture, one object, one colour photo.
HELD_OUT_PHOTOS: tuple[str, ...] = ("gravel.png", "rocket.jpg", "moon.png")
TRAIN_PHOTOS: tuple[str, ...] = tuple(p for p in PHOTOS if p not in HELD_OUT_PHOTOS)

# Camera motions: 8 single moves, and compounds "X and Y" of a pan with a zoom or a rotation.
PANS = ("pans left", "pans right", "pans up", "pans down")
ZOOMS = ("zooms in", "zooms out")
ROTATIONS = ("rotates clockwise", "rotates counterclockwise")
SINGLE_MOTIONS = PANS + ZOOMS + ROTATIONS
COMPOUND_MOTIONS = tuple(f"{z} and {p}" for z in ZOOMS + ROTATIONS for p in PANS)
# Held out: compounds whose words all occur in training (composition, not new vocabulary).
HELD_OUT_MOTIONS: tuple[str, ...] = ("zooms in and pans right", "zooms out and pans up",
                                     "rotates clockwise and pans left")
TRAIN_MOTIONS: tuple[str, ...] = SINGLE_MOTIONS + tuple(m for m in COMPOUND_MOTIONS if m not in HELD_OUT_MOTIONS)
SHAPE_MOTIONS = ("moving left", "moving right", "moving up", "moving down")

VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    [*PHOTOS.values(), "photo", "camera", "and",
     *(w for m in SINGLE_MOTIONS + SHAPE_MOTIONS for w in m.split()), *COLORS, *SHAPES]
))
"""Every word a caption can contain (the caption encoder's vocabulary), in a fixed order."""
MAX_WORDS = 16  # longest caption: "<photo> photo camera rotates counterclockwise and pans down <color> <shape> moving <dir>" = 13

SHAPE_P = 0.6  # share of videos with a procedural shape on top


def words(caption: str) -> list[str]:
    """Caption -> its words (lower case; commas are separators)."""
    return caption.lower().replace(",", " ").split()


# ----------------------------------------------------------------------------- photographs


def data_dir() -> Path:
    """``skimage/data`` of the installed wheel, found without importing ``skimage``."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("skimage: scikit-image is not installed; `pip install scikit-image>=0.26` "
                                "(its wheel ships the photographs small-wan trains on)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def load_photos(size: int = 256, device="cpu") -> torch.Tensor:
    """All ``PHOTOS`` as ``(N, 3, size, size)`` float32 in ``[0, 1]`` on ``device`` (cached).

    Each photo is centre-cropped to a square and resized with Pillow's antialiasing filter;
    grey photos get three equal channels.
    """
    key = (size, str(torch.device(device)))
    if key not in _CACHE:
        import numpy as np
        from PIL import Image

        d = data_dir()
        out = []
        for name in PHOTOS:
            path = d / name
            if not path.exists():
                raise FileNotFoundError(f"photo {name}: not in {d}; small-wan's data needs the files that "
                                        f"the scikit-image wheel ships: `pip install scikit-image>=0.26`")
            im = Image.open(path).convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.Resampling.LANCZOS)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        _CACHE[key] = torch.stack(out).to(device)
    return _CACHE[key]


# ----------------------------------------------------------------------------- one video's parameters


@dataclass(frozen=True)
class PhotoSpec:
    """What one video shows. Positions are in the photo's normalised coords ``[-1, 1]``."""

    photo: str  # background file
    motion: str  # camera motion phrase
    fg_photo: str  # foreground (parallax) layer file
    shape: tuple[str, str, str] | None  # (color, shape, shape motion) or None
    # camera: window centre at t=0 and its total displacement, half-size at t=0 and log-zoom,
    # angle at t=0 and total turn (radians); everything linear in t in [0, 1]
    c0: tuple[float, float]
    dc: tuple[float, float]
    s0: float
    dlog_s: float
    a0: float
    da: float
    # foreground: centre on screen (screen coords [-1, 1]) at t=0, own drift, radii (screen
    # units), parallax factor on the camera's screen motion, crop centre and half-size in its photo
    fg_pos: tuple[float, float]
    fg_drift: tuple[float, float]
    fg_r: tuple[float, float]
    parallax: float
    fg_crop: tuple[float, float, float]
    # shape: start (x, y) screen coords, displacement over the clip, radius (screen units), stripes
    sh_pos: tuple[float, float]
    sh_d: tuple[float, float]
    sh_r: float
    sh_stripe: tuple[float, float]

    @property
    def caption(self) -> str:
        cap = f"{PHOTOS[self.photo]} photo, camera {self.motion}"
        if self.shape is not None:
            cap += ", " + " ".join(self.shape)
        return cap


def parse_caption(caption: str) -> tuple[str, str, tuple[str, str, str] | None]:
    """``"coffee photo, camera pans left, red circle moving up"`` ->
    ``("coffee", "pans left", ("red", "circle", "moving up"))``; the shape part is optional."""
    w = words(caption)
    bad = ValueError(f"caption {caption!r}: expected '<photo> photo, camera <motion>[, <color> <shape> "
                     f"moving <dir>]' with photo in {sorted(set(PHOTOS.values()))}, motion in "
                     f"{list(SINGLE_MOTIONS + COMPOUND_MOTIONS)}")
    if len(w) < 4 or w[0] not in PHOTOS.values() or w[1:3] != ["photo", "camera"]:
        raise bad
    rest = w[3:]
    shape = None
    if len(rest) >= 4 and rest[-4] in COLORS and rest[-3] in SHAPES:
        shape = (rest[-4], rest[-3], " ".join(rest[-2:]))
        if shape[2] not in SHAPE_MOTIONS:
            raise bad
        rest = rest[:-4]
    motion = " ".join(rest)
    if motion not in SINGLE_MOTIONS + COMPOUND_MOTIONS:
        raise bad
    return w[0], motion, shape


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _choice(g: torch.Generator, seq):
    return seq[int(torch.randint(len(seq), (), generator=g))]


_DIRS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def sample_spec(g: torch.Generator, caption: str | None = None, *, held_out: bool = False) -> PhotoSpec:
    """Draw one video from ``g``. ``caption`` fixes photo word, motion and shape (the rest stays
    random); else they are drawn from the training split (or the held-out one)."""
    photos = HELD_OUT_PHOTOS if held_out else TRAIN_PHOTOS
    if caption is None:
        photo = _choice(g, photos)
        motion = _choice(g, HELD_OUT_MOTIONS if held_out else TRAIN_MOTIONS)
        shape = None
        if torch.rand((), generator=g).item() < SHAPE_P:
            shape = (_choice(g, tuple(COLORS)), _choice(g, SHAPES), _choice(g, SHAPE_MOTIONS))
    else:
        word, motion, shape = parse_caption(caption)
        photo = _choice(g, [p for p, w in PHOTOS.items() if w == word])
    parts = motion.split(" and ")
    # Camera. Half-size 0.45-0.6 of the photo (1:1 pixels at 0.5 when the photo is 2x the frame).
    s0 = _u(g, 0.45, 0.6)
    dlog_s, da, dc = 0.0, 0.0, (0.0, 0.0)
    for p in parts:
        if p.startswith("zooms"):
            # 1.35-1.8x over the clip; zooming in shrinks the window
            dlog_s = (-1 if p.endswith("in") else 1) * math.log(_u(g, 1.35, 1.8))
        elif p.startswith("rotates"):
            # 0.35-0.7 rad; image y points down, so a positive angle turns the window clockwise
            da = (-1 if p.endswith("counterclockwise") else 1) * _u(g, 0.35, 0.7)
        else:
            dx, dy = _DIRS[p.split()[1]]
            amount = _u(g, 0.35, 0.7) * s0 * 2  # 0.35-0.7 window widths over the clip
            dc = (dx * amount, dy * amount)
    if dlog_s > 0:  # zooming out: start small enough to end inside the photo
        s0 = min(s0, 0.62 / math.exp(dlog_s))
    s_max = s0 * math.exp(max(dlog_s, 0.0))
    reach = s_max * (1.42 if da else 1.0)  # a rotated window's corner reaches sqrt(2) further
    free = max(1.0 - reach, 0.0)
    # Start so that the whole move stays inside the photo where possible (reflection padding
    # covers the rest).
    c0 = tuple(_u(g, -free, free - d) if d > 0 else _u(g, -free - d, free) if d < 0 else _u(g, -free, free)
               for d in dc) if free > 0 else (0.0, 0.0)
    c0 = tuple(min(max(c, -free), free) for c in c0)
    fg_photo = _choice(g, [p for p in photos if p != photo])
    fr = _u(g, 0.3, 0.45)
    sh_r = _u(g, 0.16, 0.26)
    sh_pos, sh_d = (_u(g, -0.5, 0.5), _u(g, -0.5, 0.5)), (0.0, 0.0)
    if shape is not None:
        dx, dy = _DIRS[shape[2].split()[1]]
        travel = _u(g, 0.6, 1.1)
        along = -(travel / 2) * (dx + dy) + _u(g, -0.15, 0.15)
        cross = _u(g, -0.6, 0.6)
        sh_pos = (along, cross) if dx else (cross, along)
        sh_d = (dx * travel, dy * travel)
    return PhotoSpec(
        photo=photo, motion=motion, fg_photo=fg_photo, shape=shape,
        c0=c0, dc=dc, s0=s0, dlog_s=dlog_s, a0=_u(g, -0.15, 0.15), da=da,
        fg_pos=(_u(g, -0.5, 0.5), _u(g, -0.5, 0.5)), fg_drift=(_u(g, -0.2, 0.2), _u(g, -0.2, 0.2)),
        fg_r=(fr, fr * _u(g, 0.7, 1.3)), parallax=_u(g, 1.6, 2.4),
        fg_crop=(_u(g, -0.5, 0.5), _u(g, -0.5, 0.5), _u(g, 0.25, 0.45)),
        sh_pos=sh_pos, sh_d=sh_d, sh_r=sh_r, sh_stripe=(_u(g, 1.0, 2.5), _u(g, 0.0, 2 * math.pi)),
    )


# ----------------------------------------------------------------------------- rendering


def _photo_level(H: int, W: int) -> int:
    """Photo resolution for a frame of H x W: 2x the frame side (a window half-size of 0.5 is then
    1:1 pixels), at least 64, at most 512."""
    return int(min(512, max(64, 2 ** math.ceil(math.log2(2 * max(H, W))))))


def render(specs: list[PhotoSpec], grid: tuple[int, int, int], device="cpu",
           dtype=torch.float32) -> torch.Tensor:
    """Render ``specs`` at ``grid = (F, H, W)`` pixels -> ``(B, 3, F, H, W)`` in ``[-1, 1]``."""
    Fn, H, W = grid
    if min(grid) < 1:
        raise ValueError(f"grid: expected (F, H, W) >= 1, got {grid}")
    B = len(specs)
    photos = load_photos(_photo_level(H, W), device)
    names = list(PHOTOS)
    idx_bg = torch.tensor([names.index(s.photo) for s in specs], device=device)
    idx_fg = torch.tensor([names.index(s.fg_photo) for s in specs], device=device)
    fields = {
        "cx": [s.c0[0] for s in specs], "cy": [s.c0[1] for s in specs],
        "dcx": [s.dc[0] for s in specs], "dcy": [s.dc[1] for s in specs],
        "s0": [s.s0 for s in specs], "dlog_s": [s.dlog_s for s in specs],
        "a0": [s.a0 for s in specs], "da": [s.da for s in specs],
        "fx": [s.fg_pos[0] for s in specs], "fy": [s.fg_pos[1] for s in specs],
        "fvx": [s.fg_drift[0] for s in specs], "fvy": [s.fg_drift[1] for s in specs],
        "frx": [s.fg_r[0] for s in specs], "fry": [s.fg_r[1] for s in specs],
        "parallax": [s.parallax for s in specs],
        "crop_x": [s.fg_crop[0] for s in specs], "crop_y": [s.fg_crop[1] for s in specs],
        "crop_s": [s.fg_crop[2] for s in specs],
        "shx": [s.sh_pos[0] for s in specs], "shy": [s.sh_pos[1] for s in specs],
        "shdx": [s.sh_d[0] for s in specs], "shdy": [s.sh_d[1] for s in specs],
        "shr": [s.sh_r for s in specs], "stripe_f": [s.sh_stripe[0] for s in specs],
        "stripe_ph": [s.sh_stripe[1] for s in specs],
        "has_shape": [float(s.shape is not None) for s in specs],
        **{f"rgb{c}": [COLORS[s.shape[0]][c] if s.shape else 0.0 for s in specs] for c in range(3)},
        "shape_id": [float(SHAPES.index(s.shape[1])) if s.shape else 0.0 for s in specs],
    }
    keys = list(fields)
    table = torch.tensor([fields[k] for k in keys], dtype=torch.float32).to(device)  # one copy

    def col(name):  # (B, 1, 1, 1): broadcasts over (B, F, H, W)
        return table[keys.index(name)].view(B, 1, 1, 1)

    t = (torch.linspace(0, 1, Fn, device=device) if Fn > 1 else torch.zeros(1, device=device)).view(1, Fn, 1, 1)
    # Screen coords: x in [-1, 1] across W, y scaled by H/W so pixels are square.
    ys = ((torch.arange(H, device=device) + 0.5) / H * 2 - 1).view(1, 1, H, 1) * (H / W)
    xs = ((torch.arange(W, device=device) + 0.5) / W * 2 - 1).view(1, 1, 1, W)

    # Background: photo coord = c(t) + s(t) R(a(t)) screen.
    cx, cy = col("cx") + col("dcx") * t, col("cy") + col("dcy") * t
    s = col("s0") * torch.exp(col("dlog_s") * t)
    a = col("a0") + col("da") * t
    ca, sa = torch.cos(a), torch.sin(a)
    bg = _sample(photos[idx_bg], cx + s * (ca * xs - sa * ys), cy + s * (sa * xs + ca * ys))

    # Foreground: its screen centre moves `parallax` times as far as the background does under a
    # pan (-dc / s0 screen units), plus its own drift; it grows/shrinks with the zoom.
    zoom = torch.exp(-col("dlog_s") * t)  # screen magnification relative to t=0
    fx = col("fx") + (-col("dcx") / col("s0") * col("parallax") + col("fvx")) * t
    fy = col("fy") + (-col("dcy") / col("s0") * col("parallax") + col("fvy")) * t
    ux, uy = (xs - fx) / (col("frx") * zoom), (ys - fy) / (col("fry") * zoom)  # rim at radius 1
    rim = torch.sqrt(ux.square() + uy.square())
    fg_alpha = torch.sigmoid((1 - rim) * 12.0).unsqueeze(1)  # soft edge: ~1/6 of the radius
    fg = _sample(photos[idx_fg], col("crop_x") + col("crop_s") * ux, col("crop_y") + col("crop_s") * uy)
    video = fg_alpha * fg + (1 - fg_alpha) * bg

    # Shape: toy_video's SDF and stripes, linear motion, ~1 px anti-aliased edge.
    r = col("shr")
    px = (xs - (col("shx") + col("shdx") * t)) / r
    py = (ys - (col("shy") + col("shdy") * t)) / r
    d = _sdf(col("shape_id"), px, py)  # radii; a pixel is 2 / W screen units
    sh_alpha = (torch.sigmoid(-d * r * W) * col("has_shape")).unsqueeze(1)
    stripes = 0.5 + 0.5 * torch.cos(2 * math.pi * col("stripe_f") * px + col("stripe_ph"))
    shade = (0.65 + 0.35 * stripes).unsqueeze(1)
    rgb = torch.stack([col(f"rgb{c}") for c in range(3)], dim=1)  # (B, 3, 1, 1, 1)
    video = sh_alpha * rgb * shade + (1 - sh_alpha) * video
    return (video.clamp(0, 1) * 2 - 1).to(dtype)


def _sample(img: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """img ``(B, 3, P, P)`` at normalised coords gx, gy ``(B, F, H, W)`` -> ``(B, 3, F, H, W)``.
    Frames are stacked along the grid's rows, so the photo is not repeated per frame."""
    gx, gy = torch.broadcast_tensors(gx, gy)
    B, Fn, H, W = gx.shape
    grid = torch.stack([gx, gy], -1).reshape(B, Fn * H, W, 2)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.view(B, 3, Fn, H, W)


def sample_batch(seed: int, n: int, grid: tuple[int, int, int], device="cpu", *,
                 captions: list[str] | None = None, held_out: bool = False,
                 dtype=torch.float32) -> tuple[torch.Tensor, list[str]]:
    """``n`` videos and captions, deterministic in ``seed``: ``((n, 3, F, H, W), [n captions])``.

    ``captions`` (length n) fixes the words; else they are drawn from the training split (or the
    held-out one with ``held_out=True``).
    """
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions: expected {n} captions, got {len(captions)}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    specs = [sample_spec(g, None if captions is None else captions[i], held_out=held_out) for i in range(n)]
    return render(specs, grid, device=device, dtype=dtype), [s.caption for s in specs]


def held_out_prompts(n: int = 8) -> list[str]:
    """``n`` fixed evaluation prompts: held-out photos crossed with held-out camera motions, every
    other one with a shape. Deterministic; cycles when ``n`` exceeds the 9 combinations."""
    combos = [(p, m) for m in HELD_OUT_MOTIONS for p in HELD_OUT_PHOTOS]
    shapes = [("red", "circle", "moving up"), ("blue", "square", "moving left"),
              ("yellow", "triangle", "moving right"), ("white", "circle", "moving down")]
    out = []
    for i in range(n):
        p, m = combos[(i * 4) % len(combos)] if len(combos) > 1 else combos[0]
        cap = f"{PHOTOS[p]} photo, camera {m}"
        if i % 2:
            cap += ", " + " ".join(shapes[(i // 2) % len(shapes)])
        out.append(cap)
    return out


def train_captions(n: int = 64, seed: int = 0) -> list[str]:
    """``n`` captions drawn from the training split (calibration prompts: never held out)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [sample_spec(g).caption for _ in range(n)]
