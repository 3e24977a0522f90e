"""magicvideo_jax: MagicVideo text-to-video latent diffusion in JAX/Flax.

`from magicvideo_jax import MagicVideoPipeline` (or `MagicVideoPipelineOutput`) imports the pipeline
(and jax) on first use only, so `import magicvideo_jax` stays light.
"""

__all__ = ['MagicVideoPipeline', 'MagicVideoPipelineOutput']


def __getattr__(name):
  if name in __all__:
    from magicvideo_jax.sampling import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
