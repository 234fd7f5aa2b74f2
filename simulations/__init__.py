"""Composition layer: simulation runs, presets, experiments and benchmarks."""
