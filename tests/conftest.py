"""Test configuration. Without CUDA, Triton kernels run in its interpreter (TRITON_INTERPRET=1),
which must be set before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Fixed-seed, bounded profiles: CI runs on 2 CPU cores.
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_wan_folder(tmp_path_factory):
    """A diffusers pipeline-style folder (``transformer/`` subfolder) with a small random Wan
    (seed 0, a config nobody built in), written once with ``save_pretrained``: what the CLI
    tests pass as ``--model``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64)
    root = tmp_path_factory.mktemp("wan") / "Tiny-Wan-Diffusers"
    model.save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="session")
def hunyuan_folder(tmp_path_factory):
    """HunyuanVideo's tiny config (``hunyuan-tiny-random``, seed 0) saved once with
    ``save_pretrained``, q/k norms x4 (peaked attention: a wrong mask shows); test_hunyuan.py and
    test_hunyuan_calib.py read it with ``from_pretrained``."""
    from scaling_attn_compile.models import hunyuan
    from scaling_attn_compile.testing import sharpen_qk

    model = hunyuan.make_transformer("hunyuan-tiny-random")
    sharpen_qk(hunyuan.self_attention_modules(model))
    out = tmp_path_factory.mktemp("hunyuan")
    model.save_pretrained(out)
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
