"""CPU tests of the tiny Wan: toy data, caption encoder, model size, save/load, training, sampling,
and the attention-statistics capture."""

from __future__ import annotations

import math

import pytest
import torch

from scaling_attn_compile.tiny import attention_stats as ast
from scaling_attn_compile.tiny import tiny_wan as tw
from scaling_attn_compile.tiny import toy_video as tv

SMALL = dict(num_layers=1)  # one block: enough for wiring tests, fast on 2 cores


# ----------------------------------------------------------------------------- data


def test_video_shape_range_and_determinism():
    v, cap = tv.sample_video(3, (4, 16, 24))
    assert v.shape == (3, 4, 16, 24) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    v2, cap2 = tv.sample_video(3, (4, 16, 24))
    assert torch.equal(v, v2) and cap == cap2
    v3, _ = tv.sample_video(4, (4, 16, 24))
    assert not torch.equal(v, v3)
    tv.parse_caption(cap)  # the caption is in the grammar


def test_batch_captions_grammar_and_held_out():
    vids, caps = tv.sample_batch(0, 64, (2, 8, 8))
    assert vids.shape == (64, 3, 2, 8, 8)
    held = set(tv.HELD_OUT)
    for c in caps:
        _, color, shape, motion = tv.parse_caption(c)
        assert (color, shape, motion) not in held
    _, caps = tv.sample_batch(0, 8, (2, 8, 8), held_out=True)
    assert all(tv.parse_caption(c)[1:] in held for c in caps)
    fixed = ["red square moving left", "small blue circle bouncing", "large green triangle rotating"]
    _, caps = tv.sample_batch(1, 3, (2, 8, 8), captions=fixed)
    assert caps == fixed
    with pytest.raises(ValueError, match="motion"):
        tv.parse_caption("red square dancing")


def test_moving_left_moves_left():
    v, _ = tv.sample_video(1, (8, 32, 32), caption="large red square moving left")
    red = (v[0] > 0.3) & (v[1] < -0.3)  # (F, H, W) red pixels
    xs = [torch.nonzero(red[f], as_tuple=True)[1].float().mean().item() for f in (0, 7)]
    assert xs[1] < xs[0] - 4


# ----------------------------------------------------------------------------- model


def test_caption_encoder():
    e = tw.encode_captions(["red square moving left", ""])
    assert e.shape == (2, 8, 64)
    assert e[1].abs().sum() == 0 and e[0, 4:].abs().sum() == 0 and e[0, :4].abs().min() > 0
    with pytest.raises(ValueError, match="unknown word"):
        tw.encode_captions(["red hexagon moving left"])
    a, b = tw.CaptionEncoder.default(), tw.CaptionEncoder.default()
    assert torch.equal(a.table, b.table)


def test_param_count_and_file_size_budget():
    m = tw.make_tiny_wan()
    n = tw.param_count(m)
    assert n <= 10_000_000
    assert 2 * n <= 20e6  # fp16 weights <= 20 MB
    assert m.config.in_channels == 3 and tuple(m.config.patch_size) == (1, 2, 2)


def test_save_load_round_trip(tmp_path):
    m = tw.make_tiny_wan(seed=5, **SMALL)
    tw.save_tiny_wan(m, tmp_path)
    m2 = tw.load_tiny_wan("cpu", torch.float32, path=tmp_path)
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), m2.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1.detach().half().float(), p2)
    enc = tw.CaptionEncoder.load(tmp_path)
    assert torch.equal(enc.table, tw.CaptionEncoder.default().table)
    mb = tw.load_tiny_wan("cpu", torch.bfloat16, path=tmp_path)
    assert mb.proj_out.weight.dtype == torch.bfloat16
    assert mb.blocks[0].scale_shift_table.dtype == torch.float32  # Wan keeps it fp32


def test_generate_tiny_grid():
    m = tw.make_tiny_wan(**SMALL).eval()
    calls = []

    def spy(**kw):
        calls.append(kw["timestep"].clone())
        return m(**kw)

    caps = ["red square moving left", "blue circle bouncing"]
    v = tw.generate(m, caps, (2, 8, 8), steps=3, seed=0, transformer=spy)
    assert v.shape == (2, 3, 2, 8, 8) and torch.isfinite(v).all() and v.abs().max() <= 1
    assert len(calls) == 3 and calls[0].shape == (2,) and calls[0][0] == 1000.0
    v2 = tw.generate(m, caps[:1], (2, 8, 8), steps=3, seed=0)
    assert torch.allclose(v[:1], v2, atol=1e-5)  # sample 0 does not depend on its batch
    vg = tw.generate(m, caps, (2, 8, 8), steps=2, seed=0, guidance_scale=3.0)
    assert vg.shape == v.shape
    with pytest.raises(ValueError, match="even"):
        tw.generate(m, caps, (2, 7, 8), steps=1)


def test_train_three_steps_saves_and_loads(tmp_path):
    from scaling_attn_compile.tiny import train_tiny

    out = tmp_path / "run"
    s = train_tiny.main(["--out", str(out), "--device", "cpu", "--steps", "3", "--res", "2x8x8,2x8x16",
                         "--batch", "2", "--num-layers", "1", "--sample-steps", "2", "--log-every", "1"])
    assert s["steps"] == 3 and math.isfinite(s["val_loss"])
    for f in ("config.json", tw.WEIGHTS_NAME, tw.ENCODER_NAME, "README.md", "loss.png", "samples.png",
              "train_log.json"):
        assert (out / f).exists(), f
    m = tw.load_tiny_wan("cpu", path=out)
    assert m.config.num_layers == 1
    card = (out / "README.md").read_text()
    assert "No VAE" in card and "random init" in card


# ----------------------------------------------------------------------------- attention stats


def test_captured_qk_reproduce_attn1_output():
    """q, k from the capture, with v, reproduce blocks.0.attn1's output: the capture is exact."""
    m = tw.make_tiny_wan(**SMALL).eval()
    attn = m.blocks[0].attn1
    got = {}
    h = attn.register_forward_hook(lambda mod, args, out: got.update(inp=args[0], out=out))
    x = torch.randn(1, 3, 2, 8, 8)
    with ast.collect_qk(m) as qk, torch.no_grad():
        m(hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=tw.encode_captions(["red square moving left"]))
    h.remove()
    q, k = qk[0]
    v = attn.to_v(got["inp"]).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(attn.to_out[0](o), got["out"], atol=1e-5, rtol=1e-5)


def test_head_stats_against_full_softmax():
    g = torch.Generator().manual_seed(0)
    tg = (3, 10, 10)
    S = math.prod(tg)
    q, k = torch.randn(2, 2, S, 16, generator=g), 2 * torch.randn(2, 2, S, 16, generator=g)
    st = ast.head_stats(q, k, tg, max_elems=1000, block=64)  # forces many query chunks
    p = (q @ k.transpose(-1, -2) / 4).softmax(-1).double()
    f, y, x = (c.flatten() for c in torch.meshgrid(*(torch.arange(n) for n in tg), indexing="ij"))
    same = (f[:, None] == f[None, :]).double()
    near = (((y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2) <= 4).double()
    torch.testing.assert_close(st["frame0"], (p * same).sum(-1).mean((0, 2)))
    torch.testing.assert_close(st["radius2"], (p * near).sum(-1).mean((0, 2)))
    torch.testing.assert_close(st["entropy"], torch.special.entr(p).sum(-1).mean((0, 2)))
    u = ast.uniform_stats(tg, block=64)
    assert abs(u["frame0"] - 1 / 3) < 1e-9 and u["entropy_norm"] == 1.0


def test_model_attention_stats_random_init_is_near_uniform():
    m = tw.make_tiny_wan(**SMALL).eval()
    st = ast.model_attention_stats(m, (2, 16, 16), 0.5, n=1)
    s = ast.summarize(st)
    u = ast.uniform_stats(tw.token_grid((2, 16, 16)))
    assert set(st) == {0} and st[0]["entropy"].shape == (4,)
    assert abs(s["frame0"] - u["frame0"]) < 0.1 and s["entropy_norm"] > 0.8
    assert "| entropy_norm |" in ast.markdown_table({"random": s, "uniform": u})


# ----------------------------------------------------------------------------- shipped weights


@pytest.mark.skipif(not (tw.ASSET_DIR / tw.WEIGHTS_NAME).exists(), reason="no shipped tiny-wan weights yet")
def test_shipped_weights_forward_is_finite():
    m = tw.load_tiny_wan("cpu", torch.float32)
    assert tw.param_count(m) <= 10_000_000
    assert (tw.ASSET_DIR / tw.WEIGHTS_NAME).stat().st_size <= 20e6
    x = torch.randn(1, 3, 4, 16, 16)
    out = m(hidden_states=x, timestep=torch.tensor([500.0]),
            encoder_hidden_states=tw.encode_captions(["red square moving left"]), return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_generate_euler_convention_reaches_x0_with_exact_velocity():
    """With the exact velocity field of one clean video x0 (v = (x_t - x0) / t), the sampler must
    land on x0: pins t = 1 -> 0, timestep = 1000 t and v = noise - x0."""
    m = tw.make_tiny_wan(**SMALL).eval()
    x0, _ = tv.sample_batch(0, 1, (2, 8, 8))

    def oracle(hidden_states, timestep, **kw):
        t = (timestep / 1000).view(-1, 1, 1, 1, 1)
        return ((hidden_states - x0) / t,)

    v = tw.generate(m, ["red square moving left"], (2, 8, 8), steps=4, seed=0, transformer=oracle,
                    shift=3.0)
    torch.testing.assert_close(v, x0, atol=1e-5, rtol=0)
