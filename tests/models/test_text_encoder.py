"""Parity of `CLIPTextModel` with `transformers.CLIPTextModel`, and parameter count at SD 1.5 size.

Relative error throughout: max|ours - reference| / max|reference|.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
from magicvideo_jax.weights import torch_layout
from magicvideo_jax.models import text_encoder

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5)


def _reference(hidden_act):
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act, pad_token_id=1,
                                       bos_token_id=998, eos_token_id=999)
  model = transformers.CLIPTextModel(config).eval()
  # Random LayerNorm affines too, so a mix-up of scale and bias cannot go unnoticed.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ours(reference, hidden_act):
  model = text_encoder.CLIPTextModel(**TINY, hidden_act=hidden_act)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
  # transformers v5 drops the `text_model.` prefix from CLIPTextModel's state dict (and from what
  # `save_pretrained` writes); SD 1.x checkpoints have it. Our tree keeps it, as the checkpoints.
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  params = torch_layout.state_dict_to_params(state, template['params'], prefix='text_model')
  return model, params


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize('hidden_act', ['quick_gelu', 'gelu'])
@pytest.mark.parametrize('length', [77, 12])
def test_matches_transformers(hidden_act, length):
  reference = _reference(hidden_act)
  model, params = _ours(reference, hidden_act)
  ids = np.random.default_rng(length).integers(0, TINY['vocab_size'], size=(2, length))
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
  got = np.asarray(model.apply({'params': params}, jnp.asarray(ids, jnp.int32)))
  err = _rel_err(got, expected)
  print(f'CLIP {hidden_act} L={length}: max rel err {err:.2e}, '
        f'max abs err {np.max(np.abs(got - expected)):.2e}')
  assert got.shape == (2, length, TINY['hidden_size'])
  assert err <= 1e-5


def test_causal():
  """Changing a later token leaves the states of the earlier positions unchanged."""
  model = text_encoder.CLIPTextModel(**TINY)
  ids = jnp.arange(10, dtype=jnp.int32)[None]
  params = model.init(jax.random.key(0), ids)
  a = model.apply(params, ids)
  b = model.apply(params, ids.at[0, 6].set(999))
  np.testing.assert_array_equal(a[0, :6], b[0, :6])
  assert np.max(np.abs(a[0, 6:] - b[0, 6:])) > 1e-3


def test_logical_axes_of_embeddings():
  model = text_encoder.CLIPTextModel(**TINY)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
  emb = shapes['params']['text_model']['embeddings']
  assert emb['token_embedding']['embedding'].names == ('vocab', 'embed')
  assert emb['position_embedding']['embedding'].names == ('vocab', 'embed')


def test_too_long_input_raises():
  model = text_encoder.CLIPTextModel(**TINY)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 78), jnp.int32))


def test_parameter_count_sd15():
  config = common.text_encoder_sd15()
  model = text_encoder.CLIPTextModel(**config)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))
  flat = {'/'.join(k.key for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(shapes['params'])[0]}
  ours_count = sum(leaf.size for leaf in flat.values())
  with torch.device('meta'):  # Shapes only: nothing allocated, no init cost.
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict()))
  ref_count = sum(p.numel() for p in reference.parameters())
  # Every torch parameter has a counterpart in our tree.
  for key, _ in reference.named_parameters():
    module, _ = torch_layout.torch_key_to_path(f'text_model.{key}')
    assert any(p.startswith('/'.join(module) + '/') for p in flat), key
  print(f'CLIP text encoder SD 1.5: ours {ours_count:,} params, transformers {ref_count:,}')
  assert ours_count == ref_count
