"""WEST: block mass (torch and Triton), threshold codes, union, remap, capture, extraction.

The topology tests use a tiny diffusers ``WanTransformer3DModel`` whose layer-0 self-attention
is known by construction (:func:`structured_model`): q and k are the same constant vector for
every token (zero weights, a bias, RMS norm scaled up), placed on the RoPE channels of one axis,
so ``q_i . k_j = a^2 (cos(d) + cos(0.2 d))`` depends only on the distance ``d`` along that axis.
Head 0 then attends to its own frame (local in time), head 1 to its own image rows in every
frame (local in space). Without CUDA the Triton kernel runs interpreted (conftest).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile.contract.masks import BLOCK, num_blocks
from scaling_attn_compile.models.wan import latent_shape_for, latent_token_grid, load_transformer
from scaling_attn_compile.models.wan_capture import capture_qk
from scaling_attn_compile.offline import west
from scaling_attn_compile.offline.calibrate import (
    calibrate_west,
    capture_self_attention,
    default_timesteps,
    evenly_spaced,
    random_inputs,
)
from scaling_attn_compile.testing import assert_close_to_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def strided_qk(B, H, S, D, dtype, seed=0, device="cpu", spread=2.0):
    """q, k ``(B, H, S, D)`` views of ``(B, S, H, D)`` memory, as diffusers hands them to SDPA."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, S, H, D, generator=g) * spread).to(device, dtype).transpose(1, 2)
    k = (torch.randn(B, S, H, D, generator=g) * spread).to(device, dtype).transpose(1, 2)
    return q, k


# ---------------------------------------------------------------------------------------------
# Block mass
# ---------------------------------------------------------------------------------------------

def dense_block_mass(q, k):
    """The definition, with the full S x S matrix in float64 (small S only)."""
    B, H, S, D = q.shape
    p = (torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * D**-0.5).softmax(-1)
    nb = num_blocks(S)
    out = torch.empty(B, H, nb, nb, dtype=torch.float64)
    for u, v in itertools.product(range(nb), range(nb)):
        out[:, :, u, v] = p[:, :, u * BLOCK:(u + 1) * BLOCK, v * BLOCK:(v + 1) * BLOCK].mean((-1, -2))
    return out


@pytest.mark.parametrize("S", [128, 300, 517])
def test_block_mass_torch_matches_definition(S):
    q, k = strided_qk(2, 3, S, 16, torch.float32, seed=S)
    got = west.block_mass_torch(q, k, compute_dtype=torch.float64, max_chunk_elements=2**14)
    torch.testing.assert_close(got, dense_block_mass(q, k), rtol=1e-10, atol=1e-14)
    # Each query row's probabilities sum to 1: sum_v mass(u, v) * n_u * n_v = n_u.
    nb = num_blocks(S)
    sizes = torch.tensor([min(BLOCK, S - i * BLOCK) for i in range(nb)], dtype=torch.float64)
    torch.testing.assert_close((got * sizes).sum(-1), torch.ones_like(got[..., 0]))


@pytest.mark.parametrize("dtype,S,D", [(torch.float32, 300, 32), (torch.float16, 257, 16),
                                       (torch.float16, 384, 64), (torch.float32, 128, 16)])
def test_block_mass_triton_matches_torch(dtype, S, D):
    from scaling_attn_compile.kernels.block_mass import block_mass_triton

    q, k = strided_qk(1, 2, S, D, dtype, seed=S + D, device=DEVICE)
    got, lse = block_mass_triton(q, k, return_lse=True)
    golden = west.block_mass_torch(q, k, compute_dtype=torch.float64)
    same_dtype = west.block_mass_torch(q, k, compute_dtype=dtype)
    assert got.shape == (1, 2, num_blocks(S), num_blocks(S)) and got.dtype == torch.float32
    assert_close_to_oracle(got, golden, same_dtype, what=f"block mass {dtype} S={S} D={D}")
    ref_lse = (torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * D**-0.5).logsumexp(-1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-4)


def test_block_mass_dispatch_and_errors():
    q, k = strided_qk(1, 1, 200, 16, torch.float32)
    torch.testing.assert_close(west.block_mass(q, k, impl="torch"), west.block_mass_torch(q, k))
    with pytest.raises(ValueError, match="impl must be"):
        west.block_mass(q, k, impl="cuda")
    with pytest.raises(ValueError, match=r"\(B, H, S, D\)"):
        west.block_mass_torch(q, k[:, :, :100])


@pytest.mark.gpu
@pytest.mark.parametrize("S", [32_760])
def test_block_mass_triton_bf16_gpu(S):
    """Real size (Wan2.1-1.3B 480p: S = 32,760, D = 128), bf16, against the torch version."""
    from scaling_attn_compile.kernels.block_mass import block_mass_triton

    q, k = strided_qk(1, 2, S, 128, torch.bfloat16, seed=1, device="cuda", spread=1.0)
    got = block_mass_triton(q, k)
    golden = west.block_mass_torch(q, k, compute_dtype=torch.float64)
    same_dtype = west.block_mass_torch(q, k, compute_dtype=torch.bfloat16)
    assert_close_to_oracle(got, golden, same_dtype, what="block mass bf16 S=32760")


# ---------------------------------------------------------------------------------------------
# Threshold codes, union, nesting
# ---------------------------------------------------------------------------------------------

def brute_union_mask(masses: torch.Tensor, p: float) -> torch.Tensor:
    """OR over inputs of "block is in the top floor(p * NB) of its row", ties kept together:
    kept iff fewer than floor(p * NB) blocks of the row have strictly larger mass."""
    n_in, nb = masses.shape[0], masses.shape[-1]
    k = math.floor(p * nb + 1e-9)
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    for i, u, v in itertools.product(range(n_in), range(nb), range(nb)):
        larger = int((masses[i, u] > masses[i, u, v]).sum())
        keep[u, v] |= larger < k
    return keep


@given(n_in=st.integers(1, 3), nb=st.integers(2, 11), levels=st.integers(2, 6),
       seed=st.integers(0, 10_000))
def test_codes_union_equals_brute_force(n_in, nb, levels, seed):
    # Few distinct values, so ties are common.
    g = torch.Generator().manual_seed(seed)
    masses = torch.randint(0, levels, (n_in, nb, nb), generator=g).float()
    codes = west.threshold_codes(masses).amin(0)
    assert codes.dtype == torch.uint8 and int(codes.min()) >= 1
    for r in range(1, nb + 1):
        p = r / nb  # NB <= 255: at p = r / NB quantisation is exact
        exact = brute_union_mask(masses, p)
        assert torch.equal(west.mask_at(codes, p, diagonal=False), exact), (p, codes, masses)
    for p in (0.05, 0.33, 0.71):  # anywhere else: a superset of the exact mask (conservative)
        exact = brute_union_mask(masses, p)
        q = west.mask_at(codes, p, diagonal=False)
        assert bool((q | ~exact).all())


def test_accumulator_is_elementwise_min_and_checks_shape():
    g = torch.Generator().manual_seed(0)
    acc = west.ThresholdAccumulator(num_layers=2, num_heads=3, seq_len=5 * BLOCK)
    a, b = torch.rand(2, 3, 5, 5, generator=g), torch.rand(1, 3, 5, 5, generator=g)
    acc.update(1, a)
    acc.update(1, b)
    want = torch.minimum(west.threshold_codes(a).amin(0), west.threshold_codes(b)[0])
    assert torch.equal(acc.codes[1], want)
    assert (acc.codes[0] == west.CODE_MAX).all() and acc.updates == [0, 3]
    with pytest.raises(ValueError, match=r"\(B, H, NB, NB\)"):
        acc.update(0, torch.rand(1, 3, 4, 4))


def test_levels_nested_and_density_monotone():
    g = torch.Generator().manual_seed(3)
    codes = west.threshold_codes(torch.rand(4, 2, 37, 37, generator=g)).amin(0)  # (2, 37, 37)
    ps = [i / 40 for i in range(41)]
    masks = [west.mask_at(codes, p) for p in ps]
    for lo, hi in zip(masks, masks[1:], strict=False):
        assert bool((hi | ~lo).all()), "a level must contain every smaller level"
    dens = [m.float().mean().item() for m in masks]
    assert dens == sorted(dens) and dens[-1] == 1.0
    assert all(torch.diagonal(m, dim1=-2, dim2=-1).all() for m in masks)
    curve = west.density_by_code(codes)  # (2, 256)
    assert bool((curve[:, 1:] >= curve[:, :-1]).all())
    for d in (0.1, 0.37, 0.8, 1.0):
        c = west.codes_for_density(codes, d)
        for h in range(2):
            got = ((codes[h] <= c[h]) | torch.eye(37, dtype=torch.bool)).float().mean().item()
            assert got >= d - 1e-6
            if c[h] > 0:  # smallest such code
                below = ((codes[h] <= c[h] - 1) | torch.eye(37, dtype=torch.bool)).float().mean()
                assert below.item() < d - 1e-6


def test_mass_recall():
    q, k = strided_qk(1, 2, 300, 16, torch.float32, seed=5)
    mass = west.block_mass_torch(q, k, compute_dtype=torch.float64)
    codes = west.threshold_codes(mass)[0]
    full = west.mass_recall(mass[0], torch.ones(2, 3, 3, dtype=torch.bool), 300)
    torch.testing.assert_close(full, torch.ones(2, dtype=torch.float64))
    rec = [west.mass_recall(mass[0], west.mask_at(codes, p), 300) for p in (0.0, 0.34, 0.67)]
    assert bool((rec[0] < rec[1]).all() and (rec[1] <= rec[2]).all() and (rec[2] < 1).all())
    # Keeping only the diagonal keeps exactly the diagonal blocks' probability mass.
    p = (torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * 0.25).softmax(-1)[0]
    blk = torch.arange(300) // BLOCK
    diag_mass = (p * (blk[:, None] == blk[None, :])).sum(-1).mean(-1)
    torch.testing.assert_close(rec[0], diag_mass)


def test_code_for_rounding_and_errors():
    assert west.code_for(0.2) == 51  # 0.2 * 255 = 51.00000000000001 in floats
    assert west.code_for(1.0) == 255 and west.code_for(0.0) == 0 and west.code_for(0.3) == 77
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        west.code_for(1.5)


# ---------------------------------------------------------------------------------------------
# Remap
# ---------------------------------------------------------------------------------------------

def brute_remap(codes, g0, g1):
    """Token-level definition: T1(U, V) = min T0(u, v) over base blocks whose tokens' cells
    overlap a token of U (resp. V) in normalised 3D coordinates."""
    def cells(grid):
        F, H, W = grid
        return [(f, h, w) for f in range(F) for h in range(H) for w in range(W)]

    def overlaps(i, n1, j, n0):  # open-interval overlap of [i/n1,(i+1)/n1) and [j/n0,(j+1)/n0)
        return i * n0 < (j + 1) * n1 and j * n1 < (i + 1) * n0

    c0, c1 = cells(g0), cells(g1)
    nb1 = num_blocks(len(c1))
    touch = [set() for _ in range(nb1)]
    for t1, (f1, h1, w1) in enumerate(c1):
        for t0, (f0, h0, w0) in enumerate(c0):
            if overlaps(f1, g1[0], f0, g0[0]) and overlaps(h1, g1[1], h0, g0[1]) \
                    and overlaps(w1, g1[2], w0, g0[2]):
                touch[t1 // BLOCK].add(t0 // BLOCK)
    out = torch.empty(nb1, nb1, dtype=torch.uint8)
    for U, V in itertools.product(range(nb1), range(nb1)):
        out[U, V] = min(int(codes[u, v]) for u in touch[U] for v in touch[V])
    return out


@pytest.mark.parametrize("g0,g1", [((2, 8, 16), (2, 16, 24)), ((3, 6, 10), (2, 9, 20)),
                                   ((2, 16, 16), (2, 8, 8)), ((3, 5, 17), (3, 5, 17))])
def test_remap_matches_token_level_definition(g0, g1):
    nb0 = num_blocks(math.prod(g0))
    codes = torch.randint(1, 256, (nb0, nb0), generator=torch.Generator().manual_seed(7),
                          dtype=torch.uint8)
    got = west.remap_codes(codes[None], g0, g1)[0]
    assert torch.equal(got, brute_remap(codes, g0, g1))


def test_remap_is_conservative_and_nested():
    g0, g1 = (3, 8, 16), (3, 12, 20)
    codes = west.threshold_codes(torch.rand(2, num_blocks(384), num_blocks(384)))
    up = west.remap_codes(codes, g0, g1)
    ov = west.block_overlap(g0, g1).float()
    for p in (0.1, 0.3, 0.6):
        base = west.mask_at(codes, p, diagonal=False).float()
        # kept target (U, V) <=> some overlapping base pair (u, v) is kept
        want = torch.einsum("Uu,huv,Vv->hUV", ov, base, ov) > 0
        assert torch.equal(west.mask_at(up, p, diagonal=False), want)
    with pytest.raises(ValueError, match="from_grid"):
        west.remap_codes(codes, (3, 8, 17), g1)


# ---------------------------------------------------------------------------------------------
# Capture: exact q/k, unchanged outputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return load_transformer("tiny-random", seed=0).transformer


def _inputs(model, latent, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *latent, generator=g)
    emb = torch.randn(1, 16, model.config.text_dim, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=emb,
                return_dict=False)


def test_capture_does_not_change_outputs_and_restores(tiny):
    latent = (4, 3, 16, 20)
    kw = _inputs(tiny, latent)
    with torch.no_grad():
        plain = tiny(**kw)[0]
        seen = []
        with capture_qk(tiny, lambda c: seen.append((c.layer, c.grid, tuple(c.q.shape)))):
            captured = tiny(**kw)[0]
        after = tiny(**kw)[0]
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert seen == [(i, (3, 8, 10), (1, 2, 240, 32)) for i in range(2)]
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tiny.blocks)


def test_capture_qk_equals_what_sdpa_receives(tiny, monkeypatch):
    import diffusers.models.transformers.transformer_wan as tw

    received, original = [], tw.dispatch_attention_fn

    def spy(query, key, value, **kw):
        if key.shape[1] == query.shape[1]:  # self-attention (cross-attention keys are text)
            received.append((query.clone(), key.clone()))
        return original(query, key, value, **kw)

    monkeypatch.setattr(tw, "dispatch_attention_fn", spy)
    captured = []
    with torch.no_grad(), capture_qk(tiny, lambda c: captured.append((c.q.clone(), c.k.clone()))):
        tiny(**_inputs(tiny, (4, 2, 8, 24)))
    assert len(received) == len(captured) == 2
    for (rq, rk), (cq, ck) in zip(received, captured, strict=True):
        assert torch.equal(rq, cq.transpose(1, 2)) and torch.equal(rk, ck.transpose(1, 2))


def test_driver_trajectory_unchanged_and_step_info(tiny):
    latent = latent_shape_for(5, 64, 64, 4)  # (4, 2, 8, 8) -> grid (2, 4, 4)
    ts = default_timesteps(3, 3.0)
    inputs = random_inputs(2, 16, tiny.config.text_dim)
    info = []
    got = capture_self_attention(tiny, inputs, ts, lambda c: info.append(
        (c.input_index, c.step_index, c.layer, c.branch)), latent_shape=latent,
        capture_steps=[0, 2], progress=False)
    # The same Euler trajectory, written out without any capture machinery.
    with torch.no_grad():
        for inp, out in zip(inputs, got, strict=True):
            x = torch.randn(1, *latent, generator=torch.Generator().manual_seed(inp.seed))
            for j, t in enumerate(ts):
                v = tiny(hidden_states=x, timestep=torch.tensor([t]),
                         encoder_hidden_states=inp.prompt_embeds, return_dict=False)[0]
                x = x + ((ts[j + 1] if j + 1 < len(ts) else 0.0) - t) / 1000.0 * v
            assert torch.equal(x, out)
    assert info == [(i, j, layer, "cond") for i in range(2) for j in (0, 2) for layer in range(2)]
    assert evenly_spaced(50, 10)[0] == 0 and evenly_spaced(50, 10)[-1] == 49
    with pytest.raises(ValueError, match="descending"):
        capture_self_attention(tiny, inputs, ts[::-1], lambda c: None, latent_shape=latent,
                               progress=False)


def test_cfg_captures_both_branches(tiny):
    inp = random_inputs(1, 16, tiny.config.text_dim)[0]
    inp.negative_prompt_embeds = torch.zeros_like(inp.prompt_embeds)
    branches = []
    capture_self_attention(tiny, [inp], [900.0], lambda c: branches.append(c.branch),
                           latent_shape=(4, 2, 8, 8), progress=False)
    assert branches == ["cond", "cond", "uncond", "uncond"]


# ---------------------------------------------------------------------------------------------
# WEST recovers a topology known by construction
# ---------------------------------------------------------------------------------------------

def structured_model(strength: float = 6.0, seed: int = 0):
    """Tiny Wan (2 layers, 2 heads, head_dim 32); layer 0: head 0 local in time, head 1 local
    in image rows. Layer 1 keeps random weights."""
    m = load_transformer("tiny-random", seed=seed).transformer
    D, H = m.config.attention_head_dim, m.config.num_attention_heads
    hd = 2 * (D // 6)  # diffusers' WanRotaryPosEmbed split: t | h | w channels
    td = D - 2 * hd
    bias = torch.zeros(H, D)
    bias[0, [0, 2]] = 1.0        # time RoPE pairs 0 and 1 (frequencies 1 and 0.215)
    bias[1, [td, td + 2]] = 1.0  # row RoPE pairs 0 and 1 (frequencies 1 and 0.158)
    attn = m.blocks[0].attn1
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.zero_()
            lin.bias.copy_(bias.reshape(-1))
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.fill_(strength)
    return m


GRID_A = (4, 16, 16)  # 256 tokens a frame = 2 blocks of 8 image rows; NB = 8
GRID_B = (4, 32, 32)  # 1024 tokens a frame = 8 blocks of 4 image rows; NB = 32


def _latent(grid):
    return (4, grid[0], grid[1] * 2, grid[2] * 2)  # patch (1, 2, 2)


@pytest.fixture(scope="module")
def structured():
    m = structured_model()
    ts = default_timesteps(2, 3.0)
    plans = {}
    plans["A1"] = calibrate_west(m, random_inputs(3, 16, 32, seed=0), ts,
                                 latent_shape=_latent(GRID_A), progress=False)
    plans["A2"] = calibrate_west(m, random_inputs(3, 16, 32, seed=100), ts,
                                 latent_shape=_latent(GRID_A), progress=False)
    plans["B"] = calibrate_west(m, random_inputs(1, 16, 32, seed=0), ts[:1],
                                latent_shape=_latent(GRID_B), progress=False)
    return m, plans


def expected_masks(grid):
    """Blocks sharing a frame (head 0) / sharing image rows (head 1), as bool (NB, NB)."""
    F, H, W = grid
    tok = torch.arange(F * H * W)
    frame, row = tok // (H * W), (tok // W) % H
    nb = num_blocks(F * H * W)
    blk = tok // BLOCK
    same_frame = torch.zeros(nb, nb, dtype=torch.bool)
    same_row = torch.zeros(nb, nb, dtype=torch.bool)
    for u in range(nb):
        fu, ru = set(frame[blk == u].tolist()), set(row[blk == u].tolist())
        same_frame[u] = torch.tensor([bool(fu & set(frame[blk == v].tolist())) for v in range(nb)])
        same_row[u] = torch.tensor([bool(ru & set(row[blk == v].tolist())) for v in range(nb)])
    return same_frame, same_row


def test_west_recovers_known_topology(structured):
    _, plans = structured
    for key, grid in (("A1", GRID_A), ("B", GRID_B)):
        codes = plans[key].codes[0]  # layer 0: (H, NB, NB)
        nb = codes.shape[-1]
        same_frame, same_row = expected_masks(grid)
        # The smallest density that holds each row's true neighbourhood gives exactly it.
        p_time = same_frame.sum(1).max().item() / nb
        p_row = same_row.sum(1).max().item() / nb
        assert torch.equal(west.mask_at(codes[0], p_time), same_frame), key
        assert torch.equal(west.mask_at(codes[1], p_row), same_row), key
        # And the neighbourhood is the top of every row: ranked before all other blocks.
        assert (codes[0][same_frame].max() < codes[0][~same_frame].min()), key
        assert (codes[1][same_row].max() < codes[1][~same_row].min()), key


def test_union_stable_across_disjoint_calibration_sets(structured, capsys):
    _, plans = structured
    a, b = plans["A1"].codes, plans["A2"].codes
    report = {}
    for p in (0.25, 0.5):
        report[p] = [[west.mask_iou(west.mask_at(a[layer, h], p), west.mask_at(b[layer, h], p))
                      for h in range(a.shape[1])] for layer in range(a.shape[0])]
    with capsys.disabled():
        print(f"\n[west] union IoU between disjoint calibration sets (3 inputs each), "
              f"[layer][head]: {report}")
    # Layer 0 is weight-encoded by construction: identical whatever the prompts.
    assert all(iou == 1.0 for p in report for iou in report[p][0])
    # Layer 1 (random weights, input-dependent hidden states): reported; measured 0.65-0.82
    # here, so a union that stopped being a union (e.g. max instead of min) would fall below.
    assert min(iou for p in report for iou in report[p][1]) >= 0.5


def test_remap_small_to_large_recall(structured, capsys):
    _, plans = structured
    small, large = plans["A1"].codes, plans["B"].codes
    res = west.remap_recall(small, GRID_A, large, GRID_B, densities=(0.25, 0.5))
    with capsys.disabled():
        print(f"\n[west] remap {GRID_A} -> {GRID_B} vs native extraction: "
              + "; ".join(f"p={p}: recall {r['recall']:.3f}, IoU {r['iou']:.3f}, density "
                          f"{r['density_remapped']:.3f} vs {r['density_native']:.3f}"
                          for p, r in res.items()))
    up = west.remap_codes(small, GRID_A, GRID_B)
    same_frame, same_row = expected_masks(GRID_B)
    # Local in time at 2 blocks/frame remaps to exactly the native 8 blocks/frame.
    assert torch.equal(west.mask_at(up[0, 0], 0.25), west.mask_at(large[0, 0], 0.25))
    # Local in rows: the remapped mask at the density holding the base neighbourhood covers
    # every natively top-ranked (same-row) block: recall 1 on the mass that matters.
    assert west.mask_recall(west.mask_at(up[0, 1], 0.5), same_row) == 1.0
    for r in res.values():
        assert 0.0 < r["recall"] <= 1.0 and r["density_remapped"] > 0


def test_token_grid_and_latent_errors(tiny):
    assert latent_token_grid(tiny, (4, 21, 60, 104)) == (21, 30, 52)
    assert latent_shape_for(81, 480, 832, 16) == (16, 21, 60, 104)
    with pytest.raises(ValueError, match="frames"):
        latent_shape_for(80, 480, 832, 16)
    with pytest.raises(ValueError, match="patch size"):
        latent_token_grid(tiny, (4, 2, 9, 8))
