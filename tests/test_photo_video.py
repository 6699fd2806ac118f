"""CPU tests of the photograph videos small-wan trains on (scaling_attn_compile.tiny.photo_video)."""

from __future__ import annotations

import pytest
import torch

from scaling_attn_compile.tiny import photo_video as pv
from scaling_attn_compile.tiny.small_wan import SmallCaptionEncoder


def test_shape_range_and_determinism():
    v, caps = pv.sample_batch(3, 2, (4, 16, 24))
    assert v.shape == (2, 3, 4, 16, 24) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1 and v.std() > 0.1
    v2, caps2 = pv.sample_batch(3, 2, (4, 16, 24))
    assert torch.equal(v, v2) and caps == caps2
    v3, _ = pv.sample_batch(4, 2, (4, 16, 24))
    assert not torch.equal(v, v3)


def test_photos_come_from_the_wheel_and_a_missing_one_is_one_clear_error(tmp_path, monkeypatch):
    photos = pv.load_photos(64)
    assert photos.shape == (len(pv.PHOTOS), 3, 64, 64) and 0 <= photos.min() and photos.max() <= 1
    assert all((pv.data_dir() / f).exists() for f in pv.PHOTOS)
    monkeypatch.setattr(pv, "data_dir", lambda: tmp_path)
    monkeypatch.setattr(pv, "_CACHE", {})
    with pytest.raises(FileNotFoundError, match=r"astronaut\.png.*pip install scikit-image>=0\.26"):
        pv.load_photos(64)


def test_captions_parse_and_encode():
    _, caps = pv.sample_batch(0, 40, (1, 8, 8))
    enc = SmallCaptionEncoder.default()
    emb = enc(caps)
    assert emb.shape == (40, pv.MAX_WORDS, 64)
    for c in caps:
        word, motion, shape = pv.parse_caption(c)
        assert set(pv.words(c)) <= set(pv.VOCAB) and motion in pv.TRAIN_MOTIONS
        assert c == pv.sample_spec(torch.Generator().manual_seed(0), c).caption
    assert any(pv.parse_caption(c)[2] is not None for c in caps)
    assert any(pv.parse_caption(c)[2] is None for c in caps)
    with pytest.raises(ValueError, match="expected '<photo> photo, camera"):
        pv.parse_caption("coffee photo, camera dances")
    fixed = ["cat photo, camera zooms in", "moon photo, camera pans up, red circle moving up"]
    _, got = pv.sample_batch(1, 2, (1, 8, 8), captions=fixed)
    assert got == fixed


def test_held_out_split_is_disjoint_from_training():
    assert not set(pv.HELD_OUT_PHOTOS) & set(pv.TRAIN_PHOTOS)
    assert not set(pv.HELD_OUT_MOTIONS) & set(pv.TRAIN_MOTIONS)
    held_words = {pv.PHOTOS[p] for p in pv.HELD_OUT_PHOTOS}
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        s = pv.sample_spec(g)
        assert s.photo in pv.TRAIN_PHOTOS and s.fg_photo in pv.TRAIN_PHOTOS
        assert s.motion in pv.TRAIN_MOTIONS and pv.PHOTOS[s.photo] not in held_words
    prompts = pv.held_out_prompts(8)
    assert len(set(prompts)) == 8
    for c in prompts:
        word, motion, _ = pv.parse_caption(c)
        assert word in held_words and motion in pv.HELD_OUT_MOTIONS
    s = pv.sample_spec(g, held_out=True)
    assert s.photo in pv.HELD_OUT_PHOTOS and s.fg_photo in pv.HELD_OUT_PHOTOS


def test_trajectories_are_smooth():
    v, _ = pv.sample_batch(5, 8, (16, 64, 64))  # the native 16 frames, at half the resolution
    step = (v[:, :, 1:] - v[:, :, :-1]).abs().mean((1, 3, 4))  # (videos, frame pairs)
    other = (v[:, :, 0] - v.roll(1, dims=0)[:, :, 0]).abs().mean()  # frames of different videos
    assert step.mean() < 0.4 * other, (step.mean().item(), other.item())  # seen: 0.15 vs 0.58
    # No jumps: linear trajectories change about as much between every pair of frames (seen <= 1.8).
    assert (step.max(1).values < 2.5 * step.median(1).values).all()


def _shift(a: torch.Tensor, b: torch.Tensor, r: int = 16) -> int:
    """Horizontal shift d (pixels) minimising |b[x] - a[x - d]| over the overlap."""
    W = a.shape[-1]
    err = {d: (b[..., r + d: W - r + d] - a[..., r: W - r]).abs().mean().item() for d in range(-r, r + 1)}
    return min(err, key=err.get)


def test_camera_pan_moves_the_picture_the_other_way():
    # "camera pans left": the window moves left over the photo, so the picture moves right.
    # A pan moves the picture 0.7-1.4 half-widths over the clip: 3-6 px a frame here (8 x 64 px).
    for seed in range(3):
        left, _ = pv.sample_batch(seed, 1, (8, 64, 64), captions=["astronaut photo, camera pans left"])
        right, _ = pv.sample_batch(seed, 1, (8, 64, 64), captions=["coffee photo, camera pans right"])
        assert _shift(left[0, :, 0], left[0, :, 2]) > 0 > _shift(right[0, :, 0], right[0, :, 2])
