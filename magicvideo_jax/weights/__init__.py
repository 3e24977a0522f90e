"""Converters of third-party network weights (evaluation networks) to safetensors."""
