"""Parity of `CLIPVisionModelWithProjection` with transformers', its loader, its size at ViT-L/14,
CLIP preprocessing, and the embedding -> context bridge of `conditioning`.

Relative error throughout: max|ours - reference| / max|reference|.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from magicvideo_jax.weights import torch_layout
from magicvideo_jax.models import clip_vision  # pylint: disable=g-import-not-at-top
from magicvideo_jax.models import conditioning  # pylint: disable=g-import-not-at-top
from magicvideo_jax.weights import clip as clip_weights

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_channels=3, image_size=32, patch_size=8, projection_dim=16, layer_norm_eps=1e-5,
            hidden_act='quick_gelu')
TINY_TEXT = dict(vocab_size=100, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _perturb(model):
  # Random LayerNorm affines and class token too, so a mix-up of any two leaves cannot go unnoticed.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope='module')
def pixels():
  """CLIP-normalised-like random pixels, channels-last `[2, 32, 32, 3]`."""
  return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def reference(pixels):
  """A random tiny transformers `CLIPVisionModelWithProjection` and its outputs on `pixels`."""
  torch.set_num_threads(1)
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(**TINY)
  model = _perturb(transformers.CLIPVisionModelWithProjection(config))
  with torch.no_grad():
    out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2))
  return model, out.image_embeds.numpy(), out.last_hidden_state.numpy()


@pytest.fixture(scope='module')
def apply_fn():
  return jax.jit(clip_vision.CLIPVisionModelWithProjection(**TINY).apply)


def _check(name, got, image_embeds, last_hidden_state):
  err_e = _rel_err(np.asarray(got.image_embeds), image_embeds)
  err_h = _rel_err(np.asarray(got.last_hidden_state), last_hidden_state)
  print(f'{name}: image_embeds max rel err {err_e:.2e}, last_hidden_state max rel err {err_h:.2e}')
  assert got.image_embeds.shape == (2, TINY['projection_dim'])
  assert got.last_hidden_state.shape == (2, 1 + (32 // 8)**2, TINY['hidden_size'])
  assert err_e <= 1e-5 and err_h <= 1e-5


def test_matches_transformers(reference, pixels, apply_fn):
  model, image_embeds, last_hidden_state = reference
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  # transformers 5 keeps the `vision_model.` prefix for this class: our tree's root, as the file's.
  assert any(k.startswith('vision_model.embeddings.') for k in state)
  params = torch_layout.state_dict_to_params(state, clip_vision.abstract_params(TINY))
  _check('CLIPVisionModelWithProjection', apply_fn({'params': params}, jnp.asarray(pixels)),
         image_embeds, last_hidden_state)


def test_loads_with_projection_folder(reference, pixels, apply_fn, tmp_path):
  model, image_embeds, last_hidden_state = reference
  model.save_pretrained(str(tmp_path))
  config, params = clip_weights.load_clip_vision(str(tmp_path))
  assert config == TINY
  _check('from CLIPVisionModelWithProjection folder',
         apply_fn({'params': params}, jnp.asarray(pixels)), image_embeds, last_hidden_state)


def test_loads_clip_model_folder(pixels, apply_fn, tmp_path):
  """A whole CLIPModel: vision weights selected, top-level projection_dim used."""
  torch.manual_seed(1)
  vision = dict(TINY, projection_dim=512)  # CLIPModel sizes visual_projection by its own field.
  model = _perturb(transformers.CLIPModel(transformers.CLIPConfig(
      text_config=TINY_TEXT, vision_config=vision, projection_dim=TINY['projection_dim'])))
  model.save_pretrained(str(tmp_path))
  with torch.no_grad():
    out = model.get_image_features(torch.from_numpy(pixels).permute(0, 3, 1, 2))
  config, params = clip_weights.load_clip_vision(str(tmp_path))
  assert config == TINY
  assert set(params) == {'vision_model', 'visual_projection'}
  _check('from CLIPModel folder', apply_fn({'params': params}, jnp.asarray(pixels)),
         out.pooler_output.numpy(), out.last_hidden_state.numpy())


def test_bare_vision_model_is_refused(tmp_path):
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)).save_pretrained(str(tmp_path))
  with pytest.raises(torch_layout.ConversionError, match='visual_projection'):
    clip_weights.load_clip_vision(str(tmp_path))


def test_wrong_image_size_raises():
  model = clip_vision.CLIPVisionModelWithProjection(**TINY)
  with pytest.raises(ValueError, match='image_size=32'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))


def test_parameter_count_vit_l14():
  config = clip_vision.vision_config_vit_l14()
  shapes = clip_vision.abstract_params(config)
  flat = {'/'.join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  ours = clip_vision.count_params(shapes)
  with torch.device('meta'):  # Shapes only: nothing allocated, no init cost.
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config))
  ref_count = sum(p.numel() for p in ref.parameters())
  for key, p in ref.named_parameters():  # Every torch parameter has a same-sized counterpart.
    module, leaf = torch_layout.torch_key_to_path(key)
    base = '/'.join(module)
    names = ('kernel', 'scale', 'embedding') if leaf == 'weight' else (leaf,)
    match = [flat[f'{base}/{c}'] for c in names if f'{base}/{c}' in flat]
    assert match and match[0].size == p.numel(), key
  print(f'CLIP ViT-L/14 vision + projection: ours {ours:,} params, transformers {ref_count:,}')
  assert ours == ref_count
  assert flat['vision_model/embeddings/position_embedding/embedding'].shape == (257, 1024)
  assert flat['visual_projection/kernel'].shape == (1024, 768)


def test_preprocess():
  rng = np.random.default_rng(0)
  # A smooth, non-square image (resampling filters agree on it): short side resized, centre crop.
  yy, xx = np.mgrid[0:48, 0:64] / 16.0
  image = np.stack([np.sin(xx + c) * np.cos(0.7 * yy - c) for c in range(3)], -1) * 0.4 + 0.5
  image_u8 = np.round(image * 255).astype(np.uint8)
  got = np.asarray(clip_vision.preprocess(image_u8[None], 32))
  assert got.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(got, clip_vision.preprocess(image_u8[None] / 255.0, 32), atol=1e-5)
  processor = transformers.CLIPImageProcessor(size={'shortest_edge': 32},
                                              crop_size={'height': 32, 'width': 32})
  expected = processor(images=[image_u8], return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  err = float(np.max(np.abs(got[0] - expected)))
  print(f'preprocess vs CLIPImageProcessor (PIL bicubic vs JAX bicubic): max abs err {err:.3f}')
  assert err < 0.05  # Normalised units (~0.015 per uint8 step): the resampling filters differ.
  # At the model's size nothing is resampled: exactly (x / 255 - mean) / std; leading axes kept.
  frames = rng.integers(0, 256, size=(2, 3, 32, 32, 3), dtype=np.uint8)
  got = np.asarray(clip_vision.preprocess(frames, 32))
  want = (frames / 255.0 - np.array(clip_vision.CLIP_MEAN)) / np.array(clip_vision.CLIP_STD)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_normalize_embedding():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [-1e3, 0.0]])
  got = np.asarray(conditioning.normalize_embedding(x))
  np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-7)


def test_embedding_to_context_shared_by_text_and_image():
  module = conditioning.EmbeddingToContext(num_tokens=3, cross_attention_dim=8)
  rng = np.random.default_rng(0)
  image_embeds = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32) * 5.0
  text_embeds = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32) * 0.5
  params = module.init(jax.random.key(0), image_embeds)['params']
  assert set(params) == {'norm', 'proj'}
  assert params['proj']['kernel'].names == ('embed', 'hidden')
  params = nn.unbox(params)
  image_ctx = module.apply({'params': params}, image_embeds)
  text_ctx = module.apply({'params': params}, text_embeds)
  assert image_ctx.shape == text_ctx.shape == (2, 3, 8)
  # One path: every parameter receives gradient from either modality alone.
  for embeds in (image_embeds, text_embeds):
    grads = jax.grad(lambda p, e=embeds: jnp.sum(module.apply({'params': p}, e)**2))(params)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
  # Scale-insensitive (LayerNorm): raw and L2-normalised embeddings give nearly the same tokens.
  normed_ctx = module.apply({'params': params}, conditioning.normalize_embedding(image_embeds))
  np.testing.assert_allclose(image_ctx, normed_ctx, atol=1e-3)
  with pytest.raises(ValueError, match='projection_dim'):
    module.apply({'params': params}, image_embeds[:, None])


def test_embedding_to_context_names_itself():
  class Parent(nn.Module):

    @nn.compact
    def __call__(self, embeds):
      return conditioning.EmbeddingToContext(num_tokens=2, cross_attention_dim=4)(embeds)

  shapes = jax.eval_shape(Parent().init, jax.random.key(0), jnp.zeros((1, 16)))['params']
  assert set(shapes) == {conditioning.NAME}
  assert set(shapes[conditioning.NAME]) == {'norm', 'proj'}
