"""sampling/request.py: one resolution of a sampling call's defaults and checks (no model needed)."""

import ml_collections
import numpy as np
import pytest

from magicvideo_jax import config as config_lib
from magicvideo_jax.sampling import request as request_lib


def _config(**sampling):
  config = config_lib.base_config()
  config.sampling.update(sampling)
  config.data.update(num_frames=8, resolution=32, fps=12.0)
  return config


def test_defaults_come_from_the_config():
  req = request_lib.resolve(_config(num_inference_steps=25, guidance_scale=4.0, eta=0.3),
                            geometry=True)
  assert (req.num_inference_steps, req.guidance_scale, req.sampler, req.eta) == (25, 4.0, 'ddim', 0.3)
  assert (req.num_frames, req.height, req.width, req.fps) == (8, 32, 32, 12.0)
  assert req.sigma_spacing is None  # DDIM has none.
  assert req.do_cfg
  # Another sampler: no DDIM eta, the config's sigma spacing.
  req = request_lib.resolve(_config(eta=0.3, sigma_spacing='karras'), sampler='dpmsolver++')
  assert (req.eta, req.sigma_spacing) == (0.0, 'karras')
  # Given values win; guidance 1 runs the conditional model only.
  req = request_lib.resolve(_config(), num_inference_steps=3, guidance_scale=1.0, fps=4.0)
  assert (req.num_inference_steps, req.do_cfg, req.fps) == (3, False, 4.0)


def test_a_config_without_the_keys_takes_the_base_defaults():
  config = ml_collections.ConfigDict(dict(sampling=dict(), data=dict(),
                                          diffusion=dict(num_train_timesteps=1000)))
  base = config_lib.base_config()
  req = request_lib.resolve(config, geometry=True)
  assert req.num_inference_steps == base.sampling.num_inference_steps
  assert req.guidance_scale == base.sampling.guidance_scale
  assert req.fps == base.data.fps and req.num_frames == base.data.num_frames
  assert (req.final_sigmas_type, req.clip_sample) == ('zero', False)


@pytest.mark.parametrize('settings, match', [
    (dict(guidance_scale=float('nan')), 'guidance_scale=nan must be finite'),
    (dict(guidance_scale=float('inf')), 'guidance_scale=inf must be finite'),
    (dict(guidance_scale=-1.0), 'guidance_scale=-1.0 must be >= 0'),
    (dict(eta=float('nan')), 'eta=nan must be finite'),
    (dict(eta=0.5, sampler='dpmsolver++'), 'eta=0.5'),
    (dict(fps=float('nan')), 'fps=nan must be finite'),
    (dict(fps=0.0), 'fps=0.0 must be > 0'),
    (dict(seed=99999999999999999999), 'seed=99999999999999999999 must be in'),
    (dict(seed=1.5), 'seed=1.5 must be an integer'),
    (dict(num_inference_steps=0), 'num_inference_steps=0 must be >= 1'),
    (dict(num_inference_steps=1001), r'num_inference_steps=1001 must be an integer in \[1, 1000\]'),
    (dict(num_inference_steps=2.5), 'must be an integer'),
    (dict(sampler='euler'), "unknown sampler 'euler'"),
    (dict(sigma_spacing='karras'), r'needs sampler="dpmsolver\+\+"'),
    (dict(sampler='dpmsolver++', sigma_spacing='cosine'), "unknown sigma_spacing 'cosine'"),
    (dict(output_type='pt'), "output_type='pt'; valid: uint8, float, np, pil, latent"),
    (dict(num_videos_per_prompt=0), 'num_videos_per_prompt=0 must be >= 1'),
    (dict(num_videos_per_prompt=1.5), 'num_videos_per_prompt=1.5 must be an integer'),
    (dict(num_frames=0), 'num_frames=0 must be >= 1'),
])
def test_bad_values_are_named(settings, match):
  with pytest.raises(ValueError, match=match):
    request_lib.resolve(_config(), geometry=True, **settings)


def test_prompts_and_negatives():
  assert request_lib.prompt_list('a') == ['a']
  assert request_lib.per_clip(None, 3) == ['', '', '']
  assert request_lib.per_clip('x', 2) == ['x', 'x']
  assert request_lib.per_clip(['x', 'y'], 2) == ['x', 'y']
  for bad in ([], [1], None):
    with pytest.raises(ValueError, match='prompt must be a string'):
      request_lib.prompt_list(bad)
  with pytest.raises(ValueError, match='2 negative prompts for 3 prompts'):
    request_lib.per_clip(['x', 'y'], 3)


def test_videos_per_prompt_are_consecutive():
  assert request_lib.resolve(_config(), num_videos_per_prompt=3).num_videos_per_prompt == 3
  assert request_lib.per_video(['a', 'b'], 2) == ['a', 'a', 'b', 'b']
  assert request_lib.per_video(['a', 'b'], 1) == ['a', 'b']


def test_output_types():
  frames = np.random.default_rng(0).uniform(size=(2, 3, 4, 5, 3)).astype(np.float32)
  frames[0, 0, 0, 0] = (0.0, 1.0, 0.5)  # The ends and a half (rounds to even: 128).
  uint8 = request_lib.to_output(frames, 'uint8')
  assert uint8.dtype == np.uint8 and tuple(uint8[0, 0, 0, 0]) == (0, 255, 128)
  np.testing.assert_array_equal(uint8, (frames * 255 + 0.5).astype(np.uint8))
  assert request_lib.to_output(frames, 'float') is frames
  as_np = request_lib.to_output(frames.astype(np.float64), 'np')
  assert as_np.dtype == np.float32 and np.array_equal(as_np, frames)
  pil = request_lib.to_output(frames, 'pil')
  assert [len(video) for video in pil] == [3, 3]
  assert pil[1][2].mode == 'RGB' and pil[1][2].size == (5, 4)  # PIL sizes are (width, height).
  np.testing.assert_array_equal(np.stack([np.stack([np.asarray(f) for f in v]) for v in pil]), uint8)
  with pytest.raises(ValueError, match="output_type='latent' is not a frame type"):
    request_lib.to_output(frames, 'latent')


def test_embeddings_are_checked():
  good = np.zeros((2, 7, 4), np.float64)
  out = request_lib.embeddings(good, (7, 4))
  assert out.dtype == np.float32 and out.shape == (2, 7, 4)
  assert request_lib.embeddings(good[:1], (7, 4), batch=2).shape == (1, 7, 4)
  for bad, match in [(np.zeros((7, 4)), r'have shape \(7, 4\); expected \[B, 7, 4\]'),
                     (np.zeros((2, 7, 5)), r'expected \[B, 7, 4\]'),
                     (np.zeros((0, 7, 4)), 'have shape'),
                     (np.full((1, 7, 4), np.nan), 'non-finite')]:
    with pytest.raises(ValueError, match=match):
      request_lib.embeddings(bad, (7, 4))
  with pytest.raises(ValueError, match='negative_prompt_embeds have batch 3; expected 1 or 2'):
    request_lib.embeddings(np.zeros((3, 7, 4)), (7, 4), 'negative_prompt_embeds', batch=2)
