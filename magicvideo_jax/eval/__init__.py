"""Evaluation of generated and reconstructed videos (e.g. `judge`: the moving-shapes judge)."""
