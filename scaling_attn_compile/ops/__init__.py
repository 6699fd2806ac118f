"""The op ``torch.ops.scaling_attn.sparse_attention`` (``op``), its online energy filter
(``energy``) and a self-check against the reference (``selfcheck``)."""
