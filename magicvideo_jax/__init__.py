"""magicvideo_jax: MagicVideo text-to-video latent diffusion in JAX/Flax.

`from magicvideo_jax import MagicVideoPipeline` imports the pipeline (and jax) on first use only, so
`import magicvideo_jax` stays light.
"""

__all__ = ['MagicVideoPipeline']


def __getattr__(name):
  if name == 'MagicVideoPipeline':
    from magicvideo_jax.sampling.pipeline import MagicVideoPipeline  # pylint: disable=g-import-not-at-top
    return MagicVideoPipeline
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
