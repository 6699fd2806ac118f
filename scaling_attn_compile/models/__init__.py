"""Model adapters: the only place that knows a model family's module paths and configs.
One file per family (``wan``: diffusers Wan2.1)."""
