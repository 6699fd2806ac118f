"""CPU tests of small-wan: block count at its native grid, size, save/load, sampling, the trainer
(smoke run + resume) and its attention-structure measures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from scaling_attn_compile.tiny import attention_stats as ast
from scaling_attn_compile.tiny import small_wan as sw
from scaling_attn_compile.tiny import small_wan_card as card

SMALL = dict(num_layers=1)


def test_native_grid_has_at_least_128_blocks():
    assert sw.token_grid(sw.SMALL_WAN_GRID) == (16, 32, 32)
    assert math.prod(sw.token_grid(sw.SMALL_WAN_GRID)) == 16384
    assert sw.num_blocks() >= 128
    with pytest.raises(ValueError, match="multiples of 4"):
        sw.token_grid((4, 18, 16))


def test_size_budget():
    m = sw.make_small_wan()
    n = sum(p.numel() for p in m.parameters())
    assert 2 * n <= 15e6  # fp16 bytes: under the 16 MB a GPU run returns per file (bar: 40 MB)
    assert tuple(m.config.patch_size) == (1, 4, 4) and m.config.in_channels == 3


def test_save_load_round_trip_through_from_pretrained(tmp_path):
    m = sw.make_small_wan(seed=3, **SMALL)
    sw.save_small_wan(m, tmp_path)
    m2 = WanTransformer3DModel.from_pretrained(str(tmp_path))
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1.half().float(), p2.float())
    m3 = sw.load_small_wan("cpu", torch.bfloat16, path=tmp_path)
    assert m3.proj_out.weight.dtype == torch.bfloat16 and m3.blocks[0].scale_shift_table.dtype == torch.float32
    enc = sw.caption_encoder(tmp_path)
    assert isinstance(enc, sw.SmallCaptionEncoder) and torch.equal(enc.table, sw.SmallCaptionEncoder.default().table)
    with pytest.raises(FileNotFoundError, match="train_small_wan"):
        sw.load_small_wan(path=tmp_path / "nothing")


def test_caption_encoder_commas_and_unknown_words():
    enc = sw.SmallCaptionEncoder.default()
    a = enc(["coffee photo, camera pans left, red circle moving up", "coffee photo camera pans left red circle moving up", ""])
    assert a.shape == (3, 16, 64) and torch.equal(a[0], a[1]) and a[2].abs().sum() == 0
    with pytest.raises(ValueError, match="unknown word"):
        enc(["teapot photo, camera pans left"])


def test_generate_tiny_grid():
    m = sw.make_small_wan(**SMALL).eval()
    caps = ["cat photo, camera zooms in", "moon photo, camera pans up, red circle moving up"]
    v = sw.generate(m, caps, (2, 16, 16), steps=3, seed=0)
    assert v.shape == (2, 3, 2, 16, 16) and torch.isfinite(v).all() and v.abs().max() <= 1
    v1 = sw.generate(m, caps[:1], (2, 16, 16), steps=3, seed=0)
    assert torch.allclose(v[:1], v1, atol=1e-5)  # a sample does not depend on its batch
    assert sw.generate(m, caps, (2, 16, 16), steps=2, guidance_scale=3.0).shape == v.shape


def test_train_smoke_writes_a_loadable_folder_and_resumes(tmp_path):
    from scaling_attn_compile.tiny import train_small_wan as tr

    common = ["--device", "cpu", "--res", "2x16x16,2x16x32", "--batch", "2", "--num-layers", "1",
              "--log-every", "1", "--sample-steps", "2"]
    s = tr.main(["--out", str(tmp_path / "a"), "--steps", "3", *common])
    assert s["steps"] == 3 and math.isfinite(s["val_loss"])
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors", "caption_encoder.safetensors",
                     "README.md", "loss.png", "samples.png", "train_log.json"}  # <= 8 files come back
    WanTransformer3DModel.from_pretrained(str(tmp_path / "a"))
    s2 = tr.main(["--out", str(tmp_path / "b"), "--steps", "2", "--resume", str(tmp_path / "a"), *common])
    assert s2["steps"] == 2 and s2["total_steps"] == 5
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2, 3, 4, 5]
    assert [(r["start_step"], r["end_step"]) for r in log["runs"]] == [(0, 3), (3, 5)]
    # resumed from the saved weights, not from a fresh init
    a = sw.load_small_wan(path=tmp_path / "a")
    b = sw.load_small_wan(path=tmp_path / "b")
    fresh = sw.make_small_wan(**SMALL)
    d_ab = (a.proj_out.weight - b.proj_out.weight).abs().mean()
    d_fb = (fresh.proj_out.weight - b.proj_out.weight).abs().mean()
    assert d_ab < d_fb
    text = (tmp_path / "b" / "README.md").read_text()
    assert "5 in 2 run(s)" in text and "| local | spatial | temporal | global |" in text
    with pytest.raises(FileNotFoundError, match="--resume"):
        tr.main(["--out", str(tmp_path / "c"), "--resume", str(tmp_path / "nothing"), *common])


def test_top25_and_chance_stats():
    g = torch.Generator().manual_seed(0)
    tg = (2, 8, 16)  # 256 tokens = 4 blocks of 64
    q, k = torch.randn(1, 2, 256, 8, generator=g), 3 * torch.randn(1, 2, 256, 8, generator=g)
    st = ast.head_stats(q, k, tg, block=64, max_elems=4096)
    p = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1).double()
    pooled = p.unflatten(-1, (4, 64)).sum(-1).unflatten(2, (4, 64)).sum(3)  # (1, 2, 4, 4)
    want = (pooled.max(-1).values / pooled.sum(-1)).mean((0, 2))  # top 25% of 4 blocks = 1 block
    torch.testing.assert_close(st["top25"], want)
    chance = card.chance_stats((2, 8, 16), "cpu")
    uni = ast.uniform_stats((2, 8, 16))
    for m in ("frame0", "radius2", "blocks0.9", "top25"):
        assert abs(chance[m] - uni[m]) < 1e-6, m


def test_head_classes():
    assert card.head_class(0.9, 0.8) == "local"
    assert card.head_class(0.9, 0.1) == "spatial"
    assert card.head_class(0.2, 0.7) == "temporal"
    assert card.head_class(0.2, 0.1) == "global"
    stats = {0: {"frame1": torch.tensor([0.9, 0.1]), "radius4": torch.tensor([0.9, 0.1])}}
    assert card.class_shares(stats) == {"local": 0.5, "spatial": 0.0, "temporal": 0.0, "global": 0.5}
