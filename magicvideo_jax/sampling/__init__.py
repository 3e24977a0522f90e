"""Sampling: one resolution of a sampling call, the pipeline and the cascade's stages."""
