"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint [video | text] attention through the
adapter (models/hunyuan.py) and the joint FX pass (compile/joint.py), on a random small config
written with ``save_pretrained`` and read back with ``from_pretrained``.

CPU. Batch element 1 pads its text (``encoder_attention_mask`` zeros), so the key-padding prefix
mask -> ``kv_lens`` conversion matters. The video grid (4, 12, 12) is 576 tokens: 4 whole
blocks and one that straddles into the 20 text tokens. Checked: all-dense tables == eager
diffusers (Inductor and eager compilers); sparse two-level tables == eager with a reference
processor at both timestep buckets; the bound tables keep text rows and columns dense; rewrite
counts (2 joint layers, the text refiner dense); no recompile over a few timesteps; masks the
family does not promise are refused.
"""

from __future__ import annotations

import copy
import os
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers import transformer_hunyuan_video as hv

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.compile.joint import rewrite_joint_attention
from scaling_attn_compile.contract.masks import BLOCK, num_blocks, unpack_blocks
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import joint_tables, uniform_tables
from scaling_attn_compile.models import hunyuan
from scaling_attn_compile.testing import assert_close_to_oracle

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import _fresh_dynamo, two_level_tables  # noqa: E402,F401  (autouse fixture)

LATENT = (2, 4, 4, 24, 24)  # [B, C, F, H, W] -> grid (4, 12, 12) after patch (1, 2, 2)
GRID = (4, 12, 12)
TEXT, LAYERS, HEADS = 20, 2, 2


def load(folder):
    return HunyuanVideoTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, TEXT)
    mask[1, 9:] = 0  # batch element 1: 9 real text tokens, 11 padding
    return dict(hidden_states=torch.randn(*LATENT, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(2, 8, generator=g),
                guidance=torch.tensor([6000.0, 6000.0]))


def run(model, inputs, t):
    with torch.no_grad():
        x = inputs["hidden_states"]
        return model(timestep=torch.tensor([t, t], dtype=x.dtype, device=x.device),
                     return_dict=False, **inputs)[0]


def cast(inputs, dtype):
    return {k: v.to(dtype) for k, v in inputs.items()}


def with_reference_attention(model, video, t, dtype):
    """Each joint attention done by the op's readable reference on the joint tables, with
    ``kv_lens`` counted from diffusers' boolean mask (not from the graph pattern)."""
    joint = joint_tables(video, TEXT)

    class Reference(hv.HunyuanVideoAttnProcessor2_0):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            masks, lt, bb = joint.layer(self.layer)

            def sparse(query, key, value, attn_mask=None, **_):  # (B, S, H, D)
                lens = attn_mask.reshape(query.shape[0], -1).sum(-1).to(torch.int32)
                q, k, v = (x.transpose(1, 2) for x in (query, key, value))
                out = sparse_attention_reference(q, k, v, masks, lt, bb, torch.tensor([t, t]),
                                                 compute_dtype=dtype, kv_lens=lens)
                return out.transpose(1, 2)

            with mock.patch.object(hv, "dispatch_attention_fn", sparse):
                return super().__call__(attn, hidden_states, encoder_hidden_states,
                                        attention_mask, image_rotary_emb)

    for i, attn in enumerate(hunyuan.self_attention_modules(model)):
        attn.set_processor(Reference(i))
    return model



def eager_pair(model, inputs, t, video=None):
    """(float32, float64) eager outputs; with ``video`` tables, joint attention by the reference."""
    outs = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        if video is not None:
            with_reference_attention(m, video, t, dtype)
        outs.append(run(m, cast(inputs, dtype), t))
    return outs


def test_adapter_reads_sites_grid_timestep_and_the_prefix_mask(hunyuan_folder):
    """On the raw Dynamo graph: two joint sites (one numbering), the refiner apart, the grid
    from x_embedder, the timestep placeholder, and the mask's length node for joint sites only."""
    model, graphs = load(hunyuan_folder), []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(
        timestep=torch.tensor([500.0, 500.0]), **make_inputs())
    (gm,) = graphs
    sdpa = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    sites = [hunyuan.attention_site(n) for n in sdpa]
    kinds = [kind for _, kind, _ in sites]
    assert kinds == ["refiner", "attn", "attn"]
    assert [hunyuan.layer_index(b, hunyuan.count_double_blocks(gm))
            for b, kind, _ in sites if kind == "attn"] == [0, 1]
    assert hunyuan.find_latent_grid(gm)[0] == GRID
    assert "timestep" in hunyuan.find_timestep(gm).name
    assert hunyuan.whole_model(gm)
    s = 576 + TEXT
    lens, why = hunyuan.prefix_mask_lengths(sdpa[1].kwargs["attn_mask"], s)
    assert why == "" and lens is not None
    assert tuple(lens.meta["example_value"].shape) == (2,)
    refiner_mask = sdpa[0].kwargs.get("attn_mask") or sdpa[0].args[3]
    none, why = hunyuan.prefix_mask_lengths(refiner_mask, s)
    assert none is None and "prefix mask" in why


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_compiled_all_dense_equals_eager_diffusers(hunyuan_folder, compiler):
    model, inputs = load(hunyuan_folder), make_inputs()
    dense = lambda grid: uniform_tables(LAYERS, HEADS, grid, 1.0)
    be = scaling_attn_backend(dense, compiler=compiler, check_model=False)
    c = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    out = run(c, inputs, 700.0)
    same, golden = eager_pair(model, inputs, 700.0)
    if compiler == "inductor":
        # Inductor's own fusions (norms, RoPE, GELU) move the float32 output by ~7e-6 against
        # float64 here, 7x eager's error, without our pass: plain Inductor is the same-dtype
        # reference of an Inductor compile.
        torch._dynamo.reset()
        same = run(torch.compile(copy.deepcopy(model), backend="inductor", fullgraph=True,
                                 dynamic=False), inputs, 700.0)
    assert_close_to_oracle(out, golden, same, k=3.0, what=f"all-dense, {compiler}")
    (report,) = be.reports
    assert report.per_layer == {0: 1, 1: 1}
    assert report.left_dense == {"text refiner attention (text only)": 1}
    assert report.grid == GRID and report.seq_len == 576 + TEXT


def test_compiled_sparse_equals_reference_and_binds_dense_text(hunyuan_folder):
    model, inputs = load(hunyuan_folder), make_inputs()
    video = two_level_tables(LAYERS, HEADS, GRID)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    be = scaling_attn_backend(lambda grid: video, compiler=keep, check_model=False)
    c = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    for t in (100.0, 900.0):  # bucket 0: every head sparse; bucket 1: head 0 dense
        out = run(c, inputs, t)
        same, golden = eager_pair(model, inputs, t, video)
        assert_close_to_oracle(out, golden, same, k=3.0, what=f"sparse, t={t}")
        dense_same, _ = eager_pair(model, inputs, t)
        assert not torch.allclose(out, dense_same, atol=1e-3), "sparsity must change the output"
    for t in (500.0, 20.0, 999.0):  # the rest of a short denoising loop
        run(c, inputs, t)
    assert len(be.reports) == 1 and len(graphs) == 1, "a new timestep must not recompile"
    s, pure = 576 + TEXT, 576 // BLOCK
    for layer in range(LAYERS):
        blocks = unpack_blocks(getattr(graphs[0], f"scaling_attn_masks_{layer}"), num_blocks(s))
        assert blocks[..., pure:, :].all() and blocks[..., :, pure:].all()  # text rows/columns
        assert not blocks[..., :pure, :pure].all()  # the video part is the plan's, sparse
    op = torch.ops.scaling_attn.sparse_attention.default
    ops = [n for n in graphs[0].graph.nodes if n.target is op]
    assert len(ops) == 2 and all(len(n.args) == 11 for n in ops)  # kv_lens bound


def test_no_padding_gives_the_same_as_full_lengths(hunyuan_folder):
    """All text real: kv_lens = S, the same as no mask."""
    model, inputs = load(hunyuan_folder), make_inputs()
    inputs["encoder_attention_mask"] = torch.ones(2, TEXT)
    video = two_level_tables(LAYERS, HEADS, GRID)
    be = scaling_attn_backend(lambda grid: video, compiler="eager", check_model=False)
    out = run(torch.compile(model, backend=be, fullgraph=True, dynamic=False), inputs, 100.0)
    same, golden = eager_pair(model, inputs, 100.0, video)
    assert_close_to_oracle(out, golden, same, k=3.0, what="sparse, no padding")


def test_a_mask_the_family_does_not_promise_is_left_dense(hunyuan_folder):
    """A processor passing its own [B, 1, S, S] mask: not a prefix mask, so the site stays dense
    with a warning naming why, and nothing is rewritten."""
    model, inputs = load(hunyuan_folder), make_inputs()

    class OwnMask(hv.HunyuanVideoAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            b, _, _, n = attention_mask.shape
            own = attention_mask.expand(b, 1, n, n).clone()
            return super().__call__(attn, hidden_states, encoder_hidden_states, own,
                                    image_rotary_emb)

    for attn in hunyuan.self_attention_modules(model):
        attn.set_processor(OwnMask())
    be = scaling_attn_backend(lambda grid: uniform_tables(LAYERS, HEADS, grid, 0.3),
                              compiler="eager", check_model=False)
    with pytest.warns(UserWarning, match="not HunyuanVideo's key-padding prefix mask"):
        run(torch.compile(model, backend=be, fullgraph=True, dynamic=False), inputs, 100.0)
    (report,) = be.reports
    assert report.per_layer == {}
    assert sum(v for k, v in report.left_dense.items() if "prefix mask" in k) == 2


def test_joint_pass_refuses_a_plan_of_another_size(hunyuan_folder):
    model, graphs = load(hunyuan_folder), []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(
        timestep=torch.tensor([500.0, 500.0]), **make_inputs())
    gm, ex = graphs[0]
    from scaling_attn_compile.errors import PlanMismatchError

    with pytest.raises(PlanMismatchError, match="the plan has 3"):
        rewrite_joint_attention(gm, lambda grid: uniform_tables(3, HEADS, grid, 0.5),
                                example_inputs=ex)
    # A graph without the whole model (a graph break) cannot number single-stream blocks.
    with mock.patch.object(hunyuan, "whole_model", lambda gm: False), \
            pytest.raises(PlanMismatchError, match="single-stream block in a graph without"):
        rewrite_joint_attention(gm, lambda grid: uniform_tables(LAYERS, HEADS, grid, 0.5),
                                example_inputs=ex)


def test_registry_serves_hunyuan_and_refuses_regional_compilation(hunyuan_folder):
    from scaling_attn_compile.errors import PlanMismatchError
    from scaling_attn_compile.models import registry

    model = load(hunyuan_folder)
    assert registry.adapter_for(model) is hunyuan
    loaded = registry.load_transformer(str(hunyuan_folder))  # a folder by the class it names
    assert type(loaded.transformer).__name__ == "HunyuanVideoTransformer3DModel"
    assert type(registry.load_transformer("tiny-random").transformer).__name__ == \
        "WanTransformer3DModel"  # the built-in names of the families do not collide
    assert "HunyuanVideoTransformer3DModel" in registry.supported_classes()
    be = scaling_attn_backend(lambda grid: uniform_tables(LAYERS, HEADS, grid, 0.5),
                              check_model=False)
    handle = be.attach(model)
    with pytest.raises(PlanMismatchError, match="regional compilation of HunyuanVideo"):
        run(model, make_inputs(), 100.0)
    handle.detach()


@pytest.mark.gpu
def test_gpu_compiled_sparse_equals_reference_bf16():
    """On CUDA in bf16 (head_dim 64, the kernel's): Inductor + the template with kv_lens."""
    model = hunyuan.make_transformer("hunyuan-tiny-random", attention_head_dim=64,
                                     rope_axes_dim=(16, 24, 24))
    inputs = make_inputs()
    video = two_level_tables(LAYERS, HEADS, GRID)
    be = scaling_attn_backend(lambda grid: video, check_model=False)
    c = torch.compile(copy.deepcopy(model).cuda().to(torch.bfloat16), backend=be,
                      fullgraph=True, dynamic=False)
    out = run(c, {k: v.cuda().to(torch.bfloat16) for k, v in inputs.items()}, 100.0)
    same, golden = [], None
    for dtype in (torch.bfloat16, torch.float64):
        m = copy.deepcopy(model).cuda().to(dtype)
        with_reference_attention(m, video.to("cuda"), 100.0, dtype if dtype == torch.float64
                                 else torch.float32)
        r = run(m, {k: v.cuda().to(dtype) for k, v in inputs.items()}, 100.0)
        same, golden = (r, golden) if dtype == torch.bfloat16 else (same, r)
    assert_close_to_oracle(out, golden, same, k=3.0, what="bf16 compiled sparse")
    assert be.reports[0].per_layer == {0: 1, 1: 1}
