"""LoRA adapters (magicvideo_jax/lora.py) and their PEFT layout (weights/lora_io.py), against PEFT's
own LoRA layers on a Linear and a Conv2d."""

import json

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import tiny
from magicvideo_jax import lora as lora_lib
from magicvideo_jax import models as models_lib
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.weights import lora_io
from magicvideo_jax.weights import torch_layout

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
safetensors_torch = pytest.importorskip('safetensors.torch')


def _lora_config(rank=4, **kw):
  config = tiny.get_config()
  config.lora.update(rank=rank, **kw)
  return config


@pytest.fixture(scope='module')
def tiny_params():
  config = _lora_config(targets=(r'^unet/.*/attn[12]/to_(q|v)/kernel$', r'^unet/.*resnets_0/conv1/kernel$',
                                 r'^text_encoder/.*self_attn/q_proj/kernel$'))
  modules = models_lib.build_models(config.model)
  # Shapes from the real init (traced, not compiled), values random: folding needs nothing else.
  shapes = jax.eval_shape(lambda k: nn.unbox(state_lib.init_params(modules, config, k)),
                          jax.random.key(0))
  assert set(shapes['lora']) == {'unet', 'text_encoder'}  # init_params adds the adapters.
  rng = np.random.default_rng(0)
  base = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                      {k: v for k, v in shapes.items() if k != 'lora'})
  return config, dict(base, lora=jax.device_get(lora_lib.init(base, config, jax.random.key(1))))


def test_fresh_adapters_are_the_identity(tiny_params):
  config, params = tiny_params
  adapters = lora_lib.adapters(params['lora'])
  kinds = {np.ndim(a) for a, _ in adapters.values()}
  assert kinds == {2, 4}  # Dense and Conv kernels.
  assert any(m.startswith('text_encoder/') for m in adapters)
  for module, (lora_a, lora_b) in adapters.items():
    assert np.abs(lora_a).max() > 0 and not np.any(lora_b), module
  folded = lora_lib.fold(params, lora_lib.scale(config))
  assert lora_lib.KEY not in folded
  flat, base = (traverse_util.flatten_dict(t, sep='/') for t in (folded, params))
  assert all(np.array_equal(flat[k], base[k]) for k in flat)


def test_fold_adds_scaled_product(tiny_params):
  config, params = tiny_params
  rng = np.random.default_rng(0)
  lora = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params['lora'])
  folded = traverse_util.flatten_dict(lora_lib.fold(dict(params, lora=lora), 0.5), sep='/')
  base = traverse_util.flatten_dict(params, sep='/')
  for module, (lora_a, lora_b) in lora_lib.adapters(lora).items():
    expected = base[f'{module}/kernel'] + 0.5 * np.tensordot(lora_a, lora_b, axes=1)
    np.testing.assert_allclose(folded[f'{module}/kernel'], expected, rtol=1e-5, atol=1e-6)
  untouched = [k for k in folded if k.endswith('to_k/kernel')]
  assert untouched and all(np.array_equal(folded[k], base[k]) for k in untouched)


def test_bad_configs_are_one_line_errors(tiny_params):
  _, params = tiny_params
  for kw, message in ((dict(dropout=0.1), 'dropout'), (dict(rank=-1), 'rank'),
                      (dict(targets=()), 'targets is empty')):
    with pytest.raises(ValueError, match=message):
      lora_lib.validate(_lora_config(**kw))
  with pytest.raises(ValueError, match='matches no parameter'):
    lora_lib.target_paths(params, ['^unet/no_such_layer'])
  with pytest.raises(ValueError, match='not a Dense or Conv kernel'):
    lora_lib.target_paths(params, [r'^unet/conv_in/bias$'])


class _Toy(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.lin = torch.nn.Linear(6, 5)
    self.conv = torch.nn.Conv2d(3, 7, 3, padding=1, stride=2)


def test_peft_layers_equal_folded_kernels(tmp_path):
  """PEFT's LoRA Linear and Conv2d (r=3, alpha=6, random A and B) equal our Dense and Conv with
  the adapters folded in after a save / load through the PEFT safetensors layout."""
  torch.manual_seed(0)
  toy = _Toy().eval()
  base_state = {f'unet.{k}': v.numpy().copy() for k, v in toy.state_dict().items()}
  config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=['lin', 'conv'], init_lora_weights=False)
  toy = peft.inject_adapter_in_model(config, toy)
  lora_state = {f'unet.{k}': v for k, v in peft.get_peft_model_state_dict(toy).items()}
  assert len(lora_state) == 4
  x_lin = torch.randn(2, 6)
  x_conv = torch.randn(2, 3, 9, 9)
  with torch.no_grad():
    expected_lin = toy.lin(x_lin).numpy()
    expected_conv = toy.conv(x_conv).numpy().transpose(0, 2, 3, 1)

  # The file diffusers' save_lora_weights writes: keys with the part prefix, alpha in the metadata.
  safetensors_torch.save_file({k: v.contiguous() for k, v in lora_state.items()},
            str(tmp_path / lora_io.IMAGE_FILE),
            metadata={'format': 'pt', lora_io.METADATA_KEY: json.dumps(
                {'unet.r': 3, 'unet.lora_alpha': 6, 'unet.target_modules': ['lin', 'conv']})})
  params = torch_layout.state_dict_to_params(
      {k[len('unet.'):]: v for k, v in base_state.items()},
      {'lin': {'kernel': jnp.zeros((6, 5)), 'bias': jnp.zeros(5)},
       'conv': {'kernel': jnp.zeros((3, 3, 3, 7)), 'bias': jnp.zeros(7)}})
  template = {'unet': params}
  lora = lora_io.load(str(tmp_path), template)
  folded = lora_lib.fold(template, 1.0, lora)['unet']
  ours_lin = nn.Dense(5).apply({'params': folded['lin']}, x_lin.numpy())
  ours_conv = nn.Conv(7, (3, 3), strides=2, padding=1).apply(
      {'params': folded['conv']}, x_conv.numpy().transpose(0, 2, 3, 1))
  for name, ours, expected in (('Linear', ours_lin, expected_lin), ('Conv2d', ours_conv, expected_conv)):
    err = float(np.abs(ours - expected).max() / np.abs(expected).max())
    print(f'PEFT LoRA {name} vs folded kernel: max rel err {err:.2e}')
    assert err <= 1e-5
  # And back: our export writes PEFT's tensors (the scale folded into lora_B, alpha = r).
  image, video, metadata = lora_io.to_state_dicts(lora, alpha=3, rank=3)
  assert not video and metadata['unet.r'] == 3
  assert sorted(image) == sorted(lora_state)
  np.testing.assert_allclose(image['unet.conv.lora_B.weight'],
                             2 * lora_state['unet.conv.lora_B.weight'].numpy(), rtol=1e-6)
  np.testing.assert_array_equal(image['unet.lin.lora_A.weight'],
                                lora_state['unet.lin.lora_A.weight'].numpy())


def test_bad_lora_files(tmp_path, tiny_params):
  _, params = tiny_params
  path = str(tmp_path / 'bad.safetensors')
  save_file({'unet.down_blocks.0.nothing.lora_A.weight': np.zeros((2, 4), np.float32),
             'unet.down_blocks.0.nothing.lora_B.weight': np.zeros((4, 2), np.float32)}, path)
  with pytest.raises(torch_layout.ConversionError, match='does not have'):
    lora_io.load(path, params)
  save_file({'vae.encoder.conv_in.lora_A.weight': np.zeros((2, 4), np.float32)}, path)
  with pytest.raises(torch_layout.ConversionError, match='not a PEFT LoRA tensor'):
    lora_io.load(path, params)
  with pytest.raises(FileNotFoundError):
    lora_io.load(str(tmp_path / 'missing'), params)
