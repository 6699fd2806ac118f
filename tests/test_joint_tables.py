"""Joint tables for a ``[video | text]`` sequence (HunyuanVideo's attention): video x video
blocks from the plan, text rows, text columns and the straddling block dense."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile.contract.masks import BLOCK, add_diagonal, num_blocks, unpack_blocks
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import joint_block_mask, joint_tables, uniform_tables
from scaling_attn_compile.contract.validate import check_attention_tables
from scaling_attn_compile.testing import make_qkv


@given(grid=st.sampled_from([(1, 8, 16), (2, 8, 16), (3, 5, 7), (1, 1, 100), (4, 8, 8)]),
       text_len=st.sampled_from([0, 1, 27, 128, 200]), density=st.sampled_from([0.2, 0.5]),
       seed=st.integers(0, 100))
def test_joint_tables_keep_video_blocks_and_make_text_dense(grid, text_len, density, seed):
    video = uniform_tables(2, 3, grid, density, seed=seed)
    joint = joint_tables(video, text_len)
    s_v = math.prod(grid)
    s, nbv, nb = s_v + text_len, num_blocks(s_v), num_blocks(s_v + text_len)
    pure = s_v // BLOCK
    assert joint.seq_len == s and joint.text_len == text_len and joint.grid == video.grid
    check_attention_tables(joint, grid)
    for vm, jm, vlt, jlt in zip(video.masks, joint.masks, video.level_tables,
                                joint.level_tables, strict=True):
        vb, jb = add_diagonal(unpack_blocks(vm, nbv)), unpack_blocks(jm, nb)
        assert jb.shape == (3, 1, nb, nb)
        assert torch.equal(jb[..., :pure, :pure], vb[..., :pure, :pure])
        assert jb[..., pure:, :].all() and jb[..., :, pure:].all()  # text rows, text columns
        assert torch.equal(jlt, vlt)
    assert torch.equal(joint.bucket_bounds, video.bucket_bounds)


def test_joint_attention_is_the_video_mask_plus_dense_text():
    """Token level, independently of the block rule: a video query keeps the video keys its
    block row keeps and every text key; a text query keeps every key. S_v = 256 is two whole
    blocks, so no block straddles the boundary."""
    grid, text_len, H, D = (1, 16, 16), 77, 2, 16
    video = uniform_tables(1, H, grid, 0.5, seed=3)
    joint = joint_tables(video, text_len)
    s_v = math.prod(grid)
    s = s_v + text_len
    q, k, v = make_qkv(1, H, s, D, dtype=torch.float64)
    masks, lt, bb = joint.layer(0)
    out = sparse_attention_reference(q, k, v, masks, lt, bb, torch.tensor(1.0))
    vb = add_diagonal(unpack_blocks(video.masks[0][:, 0], num_blocks(s_v)))  # (H, NBv, NBv)
    tok = torch.ones(H, s, s, dtype=torch.bool)
    idx = torch.arange(s_v) // BLOCK
    tok[:, :s_v, :s_v] = vb[:, idx][:, :, idx]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=tok[None])
    torch.testing.assert_close(out, want)
    assert not vb.all(), "the video mask must drop something for this test to mean anything"


def test_straddling_block_is_dense_even_where_the_video_mask_dropped_it():
    s_v, text_len = 300, 40  # block 2 holds video tokens 256..299 and text 300..339
    vb = torch.zeros(3, 3, dtype=torch.bool)
    vb.fill_diagonal_(True)
    jb = joint_block_mask(vb, s_v, text_len)
    assert jb.shape == (3, 3)
    assert torch.equal(jb[:2, :2], torch.eye(2, dtype=torch.bool))
    assert jb[2].all() and jb[:, 2].all()


def test_joint_tables_refuse_bad_input_in_one_line():
    with pytest.raises(ValueError, match=r"video_blocks must be \(\.\.\., 3, 3\)"):
        joint_block_mask(torch.ones(2, 2, dtype=torch.bool), 300, 5)
    with pytest.raises(ValueError, match="text_len must be >= 0"):
        joint_block_mask(torch.ones(3, 3, dtype=torch.bool), 300, -1)
    joint = joint_tables(uniform_tables(1, 1, (1, 8, 16), 1.0), 10)
    with pytest.raises(ValueError, match="already hold 10 text tokens"):
        joint_tables(joint, 10)
