"""Weight import / export: diffusers folder -> our checkpoint -> diffusers safetensors.

Uses the tiny random SD folder of `conftest.tiny_sd_dir` and its conversion `tiny_converted_dir`
(`python -m magicvideo_jax.convert`, run in-process).
"""

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

from magicvideo_jax.weights import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from magicvideo_jax import convert as convert_cli
from magicvideo_jax.weights import convert
from magicvideo_jax.weights import torch_layout
from magicvideo_jax import models as models_lib
from magicvideo_jax.sampling import pipeline as pipeline_lib
from safetensors.numpy import load_file, save_file
from magicvideo_jax.weights import surgery

NAMES = tuple(convert.MODEL_FILES)  # unet, vae, text_encoder


def flat(tree):
  return traverse_util.flatten_dict(nn.unbox(tree), sep='/')


def copy_pipeline(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def rewrite(folder, name, edit):
  """Applies `edit(state) -> state` to the safetensors file of model folder `name`."""
  path = os.path.join(folder, name, convert.MODEL_FILES[name])
  save_file(edit(load_file(path)), path)


def assert_same_tensors(expected, got, what):
  assert sorted(expected) == sorted(got), f'{what}: names differ: ' + str(
      sorted(set(expected) ^ set(got))[:5])
  for key, value in expected.items():
    assert got[key].shape == value.shape and got[key].dtype == value.dtype, (what, key)
    np.testing.assert_array_equal(got[key], value, err_msg=f'{what}: {key}')


def test_converted_folder(tiny_converted_dir):
  config = ckpt_lib.load_config(tiny_converted_dir)
  assert os.path.isdir(os.path.join(tiny_converted_dir, 'params'))
  assert os.listdir(os.path.join(tiny_converted_dir, 'tokenizer'))
  assert config.model.unet.num_frames == 4 and config.model.unet.frame_adaptor
  assert config.model.unet.block_out_channels == (32, 64)
  assert config.diffusion.beta_schedule == 'scaled_linear' and config.diffusion.steps_offset == 1
  assert config.diffusion.set_alpha_to_one is False
  assert config.sampling.sampler == 'ddim' and config.sampling.clip_sample is False
  assert config.data.resolution == 32


def test_round_trip_is_exact(tiny_sd_dir, tiny_converted_dir, tmp_path):
  """diffusers -> ours -> diffusers gives back every tensor (names, shapes, dtypes, values)."""
  out = str(tmp_path / 'with_reference')
  convert_cli.main(['--export_from', tiny_converted_dir, '--output', out, '--reference_dir', tiny_sd_dir])
  originals = {n: torch_layout.load_safetensors_folder(os.path.join(tiny_sd_dir, n)) for n in NAMES}
  for name in NAMES:
    exported = torch_layout.load_safetensors_folder(os.path.join(out, name))
    assert_same_tensors(originals[name], exported, name)
    print(f'{name}: {len(exported)} tensors identical')
  assert not any(k.startswith('text_model.') for k in originals['text_encoder'])  # transformers 5.
  reloaded = diffusers.StableDiffusionPipeline.from_pretrained(out)  # A complete pipeline folder.
  assert list(reloaded.unet.config.block_out_channels) == [32, 64]

  # Without a reference: our configs and SD's `text_model.` key style; both libraries load it.
  plain = str(tmp_path / 'plain')
  convert_cli.main(['--export_from', tiny_converted_dir, '--output', plain])
  for name in ('unet', 'vae'):
    assert_same_tensors(originals[name], torch_layout.load_safetensors_folder(os.path.join(plain, name)),
                        name)
  text = torch_layout.load_safetensors_folder(os.path.join(plain, 'text_encoder'))
  assert_same_tensors({f'text_model.{k}': v for k, v in originals['text_encoder'].items()}, text,
                      'text_encoder')
  assert isinstance(diffusers.DiffusionPipeline.from_pretrained(plain),
                    diffusers.StableDiffusionPipeline)  # model_index.json, scheduler/ from our config.
  back = flat(convert.convert_diffusers_folder(plain)[1])
  expected = flat(ckpt_lib.load_pretrained(tiny_converted_dir)[1])
  assert sorted(back) == sorted(expected) and all(np.array_equal(back[k], expected[k]) for k in back)
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(plain, 'unet'))
  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(plain, 'vae'))
  clip = transformers.CLIPTextModel.from_pretrained(os.path.join(plain, 'text_encoder'))
  for model, name in ((unet, 'unet'), (vae, 'vae'), (clip, 'text_encoder')):
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()
             if not k.endswith('position_ids')}
    assert_same_tensors(originals[name], state, f'{name} reloaded by torch')


def test_text_encoder_prefix_both_ways(tiny_sd_dir, tiny_converted_dir, tmp_path):
  """SD's CLIP files have `text_model.`; transformers 5 writes none. Both import; export keeps the
  reference's style."""
  config, params, _ = ckpt_lib.load_pretrained(tiny_converted_dir)
  sd_style = copy_pipeline(tiny_sd_dir, tmp_path / 'sd_style')
  rewrite(sd_style, 'text_encoder', lambda s: {f'text_model.{k}': v for k, v in s.items()})
  state, prefix = convert.load_model_state(os.path.join(sd_style, 'text_encoder'), 'text_encoder')
  assert prefix == '' and all(k.startswith('text_model.') for k in state)
  template = surgery.abstract_params_for(config)['text_encoder']
  loaded = flat(torch_layout.state_dict_to_params(state, template, prefix=prefix))
  expected = flat(params['text_encoder'])
  assert sorted(loaded) == sorted(expected)
  assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
  out = str(tmp_path / 'export')
  convert.export_diffusers(params, config, out, reference_dir=sd_style)
  assert_same_tensors(load_file(os.path.join(sd_style, 'text_encoder', 'model.safetensors')),
                      torch_layout.load_safetensors_folder(os.path.join(out, 'text_encoder')),
                      'text_encoder (SD style)')


def test_video_model_is_diffusers_image_model_per_frame(tiny_sd_dir, tiny_converted_dir):
  """The converted video U-Net (video layers at identity init) on 3 frames equals diffusers' U-Net
  on each frame."""
  config, params, _ = ckpt_lib.load_pretrained(tiny_converted_dir)
  leaves = flat(params['unet'])
  video = {p: v for p, v in leaves.items() if torch_layout.is_video_only(p)}
  groups = {g for p in video for g in ('adaptor', 'temporal', 'fps_') if g in p}
  assert groups == {'adaptor', 'temporal', 'fps_'}
  for path, value in video.items():  # The identity init: S = 1, B = 0, zero output projections.
    if 'adaptor/scale' in path:
      np.testing.assert_array_equal(value, 1.0)
    elif 'adaptor/bias' in path or 'to_out_0' in path or 'linear_2' in path:
      np.testing.assert_array_equal(value, 0.0, err_msg=path)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 16, 16, 4)).astype(np.float32)
  ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
  t = np.array([601], np.int32)
  unet = models_lib.build_unet(config.model)
  ours = np.asarray(jax.jit(unet.apply)({'params': params['unet']}, x, t, ctx,
                                        fps=np.array([12.0], np.float32)))
  reference = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(tiny_sd_dir, 'unet'))
  with torch.no_grad():
    expected = reference(torch.from_numpy(x[0].transpose(0, 3, 1, 2).copy()),
                         torch.from_numpy(np.repeat(t, 3)),
                         torch.from_numpy(np.repeat(ctx, 3, axis=0))).sample.numpy()
  expected = expected.transpose(0, 2, 3, 1)[None]
  err = float(np.abs(ours - expected).max() / np.abs(expected).max())
  print(f'converted video U-Net (3 frames) vs diffusers per frame: max rel err {err:.2e}')
  assert err <= 1e-5


def test_pickle_refused(tiny_sd_dir, tmp_path):
  src = copy_pipeline(tiny_sd_dir, tmp_path / 'pickled')
  unet_dir = os.path.join(src, 'unet')
  os.remove(os.path.join(unet_dir, 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(unet_dir, 'diffusion_pytorch_model.bin'), 'wb') as f:
    f.write(b'not loaded')  # Never opened: the converter refuses by name.
  with pytest.raises(torch_layout.ConversionError, match=r'pickle.*safetensors'):
    convert.convert_diffusers_folder(src)
  with pytest.raises(torch_layout.ConversionError, match='safetensors'):
    pipeline_lib.MagicVideoPipeline.from_pretrained(src)
  ckpt = tmp_path / 'sd.ckpt'
  ckpt.write_bytes(b'not loaded')
  with pytest.raises(SystemExit, match=r'error: .*pickle.*convert it to safetensors'):
    convert_cli.main(['--diffusers_dir', str(ckpt), '--output', str(tmp_path / 'out')])
  with pytest.raises(torch_layout.ConversionError, match=r'pickle.*safetensors'):
    pipeline_lib.MagicVideoPipeline.from_pretrained(str(ckpt))


def test_missing_and_mismatched_tensors(tiny_sd_dir, tiny_converted_dir, tmp_path):
  src = copy_pipeline(tiny_sd_dir, tmp_path / 'broken')
  key = 'down_blocks.0.resnets.0.conv1.weight'
  rewrite(src, 'unet', lambda s: {k: v for k, v in s.items() if k != key})
  with pytest.raises(torch_layout.ConversionError, match=rf"missing .*'{key}'"):
    convert.convert_diffusers_folder(src)

  config = ckpt_lib.load_config(tiny_converted_dir)
  template = surgery.abstract_params_for(config)
  vae = torch_layout.load_safetensors_folder(os.path.join(tiny_sd_dir, 'vae'))
  bad = dict(vae, **{'decoder.conv_in.weight': vae['decoder.conv_in.weight'][:, :2]})
  with pytest.raises(torch_layout.ConversionError,
                     match=r"'decoder.conv_in.weight' has shape \(32, 2, 3, 3\)"):
    torch_layout.state_dict_to_params(bad, template['vae'])
  with pytest.raises(torch_layout.ConversionError, match="'decoder.extra.weight'"):
    torch_layout.state_dict_to_params(dict(vae, **{'decoder.extra.weight': vae['quant_conv.bias']}),
                                 template['vae'])
  text, prefix = convert.load_model_state(os.path.join(tiny_sd_dir, 'text_encoder'), 'text_encoder')
  text.pop('final_layer_norm.weight')
  with pytest.raises(torch_layout.ConversionError, match=r"missing .*'final_layer_norm.weight'"):
    torch_layout.state_dict_to_params(text, template['text_encoder'], prefix=prefix)


def test_scheduler_configs():
  diffusion, sampling = convert.scheduler_config_from_diffusers(dict(  # SD 1.5's scheduler.
      _class_name='PNDMScheduler', beta_end=0.012, beta_schedule='scaled_linear',
      beta_start=0.00085, num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
      steps_offset=1, trained_betas=None, clip_sample=False))
  assert (diffusion['beta_schedule'], diffusion['steps_offset'], diffusion['set_alpha_to_one'],
          diffusion['timestep_spacing']) == ('scaled_linear', 1, False, 'leading')
  assert sampling['sampler'] == 'ddim' and not sampling['clip_sample']
  diffusion, sampling = convert.scheduler_config_from_diffusers(dict(
      _class_name='DPMSolverMultistepScheduler', use_karras_sigmas=True,
      prediction_type='v_prediction'))
  assert (sampling['sampler'], sampling['sigma_spacing']) == ('dpmsolver++', 'karras')
  assert (diffusion['prediction_type'], diffusion['timestep_spacing'],
          diffusion['beta_schedule']) == ('v_prediction', 'linspace', 'linear')
  assert convert.scheduler_config_from_diffusers({'_class_name': 'DDIMScheduler'})[1]['clip_sample']
  assert not convert.scheduler_config_from_diffusers({})[0]['rescale_betas_zero_snr']
  zero_snr = convert.scheduler_config_from_diffusers(dict(
      rescale_betas_zero_snr=True, prediction_type='v_prediction', timestep_spacing='trailing'))[0]
  assert zero_snr['rescale_betas_zero_snr'] and zero_snr['timestep_spacing'] == 'trailing'
  with pytest.raises(torch_layout.ConversionError, match='thresholding'):
    convert.scheduler_config_from_diffusers(dict(thresholding=True))
