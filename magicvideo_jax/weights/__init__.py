"""Weights: Orbax checkpoints and pretrained folders, diffusers/transformers safetensors, surgery."""
