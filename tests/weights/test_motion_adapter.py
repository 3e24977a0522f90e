"""AnimateDiff through `python -m magicvideo_jax.convert`: a diffusers MotionAdapter folder plus the tiny
SD folder -> our checkpoint -> MotionAdapter again (bit for bit), the sampling loop against diffusers'
`AnimateDiffPipeline` (DDIM, guidance, same latents), and the refusals of adapters that do not fit."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from magicvideo_jax import convert as convert_cli
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import motion_adapter as ma_lib

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from conftest import TINY_MOTION_ADAPTER as TINY_ADAPTER  # pylint: disable=g-import-not-at-top
from conftest import TINY_SD_FRAMES  # pylint: disable=g-import-not-at-top

SIZE, LATENT, STEPS, GUIDANCE = 32, 16, 3, 7.5
TOLERANCE = 2e-3  # Max |ours - diffusers| on [0, 1] frames, as tests/sampling/test_pipeline.py.


@pytest.fixture(scope='module')
def adapter_dir(tmp_path_factory):
  """A random tiny MotionAdapter (every tensor perturbed, position tables included), saved by
  diffusers (safetensors)."""
  torch.manual_seed(1)
  torch.set_num_threads(1)
  adapter = diffusers.MotionAdapter(**TINY_ADAPTER).eval()
  with torch.no_grad():
    for p in adapter.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp('motion_adapter') / 'adapter')
  adapter.save_pretrained(folder)
  return folder


@pytest.fixture(scope='module')
def converted_dir(tiny_sd_dir, adapter_dir, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('animatediff') / 'checkpoint')
  convert_cli.main(['--diffusers_dir', tiny_sd_dir, '--motion_adapter_dir', adapter_dir,
                    '--output', folder, '--num_frames', str(TINY_SD_FRAMES)])
  return folder


def test_round_trip_is_exact(adapter_dir, converted_dir, tmp_path):
  config = ckpt_lib.load_config(converted_dir)
  assert config.model.unet.temporal_attention == 'animatediff'
  assert config.model.unet.motion_max_seq_length == TINY_ADAPTER['motion_max_seq_length']
  out = str(tmp_path / 'exported')
  convert_cli.main(['--export_motion_adapter', converted_dir, '--output', out])
  original = load_file(os.path.join(adapter_dir, ma_lib.WEIGHTS_FILE))
  exported = load_file(os.path.join(out, ma_lib.WEIGHTS_FILE))
  assert sorted(exported) == sorted(original)
  assert any(k.endswith('pos_embed.pe') for k in original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert np.array_equal(exported[key], value), f'{key} changed in the round trip'
  # diffusers reads the folder back with the same config.
  reloaded = diffusers.MotionAdapter.from_pretrained(out)
  for key, value in TINY_ADAPTER.items():
    got = reloaded.config[key]
    assert (tuple(got) if isinstance(got, list) else got) == value, key

  # --export_from: the pipeline folder with the MotionAdapter beside it, which AnimateDiff loads.
  pipeline_dir = str(tmp_path / 'pipeline')
  convert_cli.main(['--export_from', converted_dir, '--output', pipeline_dir])
  adapter_out = os.path.join(pipeline_dir, convert_cli.MOTION_ADAPTER_DIR)
  beside = load_file(os.path.join(adapter_out, ma_lib.WEIGHTS_FILE))
  assert sorted(beside) == sorted(original)
  assert all(np.array_equal(beside[k], v) for k, v in original.items())
  animatediff = diffusers.AnimateDiffPipeline.from_pretrained(
      pipeline_dir, motion_adapter=diffusers.MotionAdapter.from_pretrained(adapter_out))
  assert isinstance(animatediff.unet, diffusers.UNetMotionModel)


def test_sampling_matches_animatediff_pipeline(tiny_sd_dir, adapter_dir, converted_dir):
  from magicvideo_jax import MagicVideoPipeline  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
  reference = diffusers.AnimateDiffPipeline(
      vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
      motion_adapter=diffusers.MotionAdapter.from_pretrained(adapter_dir),
      scheduler=diffusers.DDIMScheduler.from_config(sd.scheduler.config))
  reference.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, TINY_SD_FRAMES, LATENT, LATENT, 4)).astype(np.float32)
  prompt, negative = 'a red circle', 'the blue'
  with torch.no_grad():
    expected = reference(
        prompt, negative_prompt=negative, num_frames=TINY_SD_FRAMES, height=SIZE, width=SIZE,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type='np',
        latents=torch.from_numpy(latents.transpose(0, 4, 1, 2, 3).copy())).frames
  expected = np.asarray(expected)
  pipe = MagicVideoPipeline.from_pretrained(converted_dir)
  ours = pipe(prompt, negative_prompt=negative, latents=latents, num_frames=TINY_SD_FRAMES,
              height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
              output_type='float')
  assert ours.shape == expected.shape, (ours.shape, expected.shape)
  err = float(np.abs(ours - expected).max())
  motion = float(np.abs(expected - expected.mean(1, keepdims=True)).max())
  print(f'AnimateDiff sampling ({STEPS} DDIM steps, guidance {GUIDANCE}): ours vs '
        f'AnimateDiffPipeline max abs err {err:.2e} on [0, 1] frames (frames differ by {motion:.3f})')
  assert err <= TOLERANCE, f'max abs error {err:.2e} > {TOLERANCE}'
  with pytest.raises(ValueError, match='at once'):  # Beyond the position table.
    pipe('x', num_frames=TINY_ADAPTER['motion_max_seq_length'] + 1, height=SIZE, width=SIZE)


def _broken_adapter(adapter_dir, tmp_path, edit_config=None, drop=None):
  folder = str(tmp_path / 'broken')
  shutil.copytree(adapter_dir, folder)
  if edit_config:
    path = os.path.join(folder, ma_lib.CONFIG_FILE)
    with open(path) as f:
      cfg = json.load(f)
    with open(path, 'w') as f:
      json.dump(edit_config(cfg), f)
  if drop:
    path = os.path.join(folder, ma_lib.WEIGHTS_FILE)
    state = load_file(path)
    del state[drop]
    save_file(state, path)
  return folder


def _convert_error(tiny_sd_dir, adapter, tmp_path):
  with pytest.raises(SystemExit) as info:
    convert_cli.main(['--diffusers_dir', tiny_sd_dir, '--motion_adapter_dir', adapter,
                      '--output', str(tmp_path / 'out')])
  message = str(info.value)
  assert '\n' not in message
  return message


def test_adapters_that_do_not_fit_are_refused(tiny_sd_dir, adapter_dir, tmp_path):
  wrong = _broken_adapter(adapter_dir, tmp_path / 'a',
                          edit_config=lambda c: dict(c, block_out_channels=[32, 128]))
  assert 'block_out_channels (32, 128) do not match' in _convert_error(tiny_sd_dir, wrong, tmp_path)
  key = 'up_blocks.1.motion_modules.1.proj_out.weight'
  missing = _broken_adapter(adapter_dir, tmp_path / 'b', drop=key)
  assert key in _convert_error(tiny_sd_dir, missing, tmp_path)
  pickled = str(tmp_path / 'pickled')
  os.makedirs(pickled)
  shutil.copy(os.path.join(adapter_dir, ma_lib.CONFIG_FILE), pickled)
  with open(os.path.join(pickled, 'diffusion_pytorch_model.bin'), 'wb') as f:
    f.write(b'not read')
  assert 'never loaded' in _convert_error(tiny_sd_dir, pickled, tmp_path)


def test_export_needs_motion_modules(tiny_converted_dir, tmp_path):
  with pytest.raises(SystemExit, match="not 'animatediff'"):
    convert_cli.main(['--export_motion_adapter', tiny_converted_dir, '--output', str(tmp_path)])
