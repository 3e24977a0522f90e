"""`checkpoint.merge_pretrained`: a separately trained VideoVAE goes into a text-to-video folder."""

import os

import flax.linen as nn
import jax
import pytest
import numpy as np
from flax import traverse_util

from configs import tiny
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax import models as models_lib
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import train


def _folder(path, config, seed):
  modules = models_lib.build_models(config.model)
  params = jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, config, k)))(jax.random.key(seed))
  ckpt_lib.save_pretrained(str(path), config, params, train.build_tokenizer(config))
  return traverse_util.flatten_dict(jax.device_get(params), sep='/')


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_merge_takes_the_vae_params_and_config(tmp_path):
  base_config = tiny.get_config('video')
  vae_config = tiny.get_config('video')
  vae_config.model.video_vae.enabled = True
  base = _folder(tmp_path / 'base', base_config, 0)
  other = _folder(tmp_path / 'other', vae_config, 1)
  assert any('temporal' in k for k in other if k.startswith('vae/decoder'))
  ckpt_lib.main(['merge', '--base', str(tmp_path / 'base'), '--other', str(tmp_path / 'other'),
                 '--output', str(tmp_path / 'merged')])
  config, params, tokenizer = ckpt_lib.load_pretrained(str(tmp_path / 'merged'))
  merged = traverse_util.flatten_dict(params, sep='/')
  assert config.model.video_vae.enabled and models_lib.uses_video_vae(config.model)
  assert set(merged) == {k for k in base if not k.startswith('vae/')} | {
      k for k in other if k.startswith('vae/')}
  for k, v in merged.items():
    np.testing.assert_array_equal(v, (other if k.startswith('vae/') else base)[k])
  assert tokenizer is not None


def _param_bytes(folder):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
             os.walk(os.path.join(folder, ckpt_lib.PARAMS_DIR)) for f in files)


def test_cast_stores_half_and_loads_as_the_models_dtype(tmp_path):
  config = tiny.get_config('image')
  original = _folder(tmp_path / 'full', config, 0)
  for dtype in ('float16', 'bfloat16'):
    half = str(tmp_path / dtype)
    assert ckpt_lib.main(['cast', '--input', str(tmp_path / 'full'), '--output', half,
                          '--dtype', dtype]) == 0
    ratio = _param_bytes(half) / _param_bytes(str(tmp_path / 'full'))
    assert ratio < 0.6, (dtype, ratio)
    _, params, _ = ckpt_lib.load_pretrained(half)
    for k, v in traverse_util.flatten_dict(params, sep='/').items():
      assert v.dtype == original[k].dtype == np.float32, k
      np.testing.assert_array_equal(v, original[k].astype(dtype).astype(np.float32))
  assert ckpt_lib.main(['cast', '--input', str(tmp_path / 'missing'), '--output',
                        str(tmp_path / 'x')]) == 2
