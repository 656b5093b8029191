"""Numpy-only quantization maths: the single source of truth for grids, clusters and folds."""
