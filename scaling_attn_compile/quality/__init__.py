"""The quality study's parts, shared by ``benchmarks/bench_quality.py`` and its tests.

``models``   the registry of bundled models (loader, caption encoder, sampler, prompts, grid)
``measure``  the counting attention path (computed blocks per prompt) and energy calibration
``methods``  each method's tables (WEST+FAST, baselines, energy filters, the anchors)
``timing``   ms per denoising step through the real compiled path (CUDA events)
``report``   records, the bar checks (equal density, Pareto in time), tables and plots
``claims``   the paper-claims part (topology and schedule stability, resolution transfer)
"""
