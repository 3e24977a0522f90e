"""Test setup: 8 fake CPU devices for sharding tests, float32 everywhere, shared fixtures."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('KERAS_HOME', os.path.join(os.path.dirname(__file__), '..', '.keras'))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import tempfile

import pytest

# Compiled programs are shared between tests and the subprocesses they start.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'magicvideo_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


@pytest.fixture(scope='session')
def shapes_data_dir(tmp_path_factory):
  """A TFDS data dir holding moving_shapes/tiny (8 frames of 32x32; 256/64/64 clips)."""
  import tensorflow_datasets as tfds
  from magicvideo_jax.data import moving_shapes
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = moving_shapes.MovingShapes(config='tiny', data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


# ------------------------------------------------------------------------------------------------
# A tiny random Stable Diffusion pipeline (diffusers layout, safetensors) and its conversion, shared by
# tests/sampling/test_pipeline.py and tests/weights/test_convert.py.

TINY_SD = dict(
    text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, hidden_act='quick_gelu'),
    unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
              down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
              up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
              attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
             layers_per_block=1, norm_num_groups=8, down_block_types=('DownEncoderBlock2D',) * 2,
             up_block_types=('UpDecoderBlock2D',) * 2, sample_size=32),
)
TINY_SD_FRAMES = 4  # Frames the converted video layers support.
# A tiny AnimateDiff MotionAdapter for TINY_SD's U-Net (tests/models/test_animatediff.py,
# tests/weights/test_motion_adapter.py).
TINY_MOTION_ADAPTER = dict(block_out_channels=(32, 64), motion_layers_per_block=1,
                           motion_num_attention_heads=2, motion_norm_num_groups=8,
                           motion_max_seq_length=6, use_motion_mid_block=True)


def _write_tiny_clip_vocab(folder):
  """A character-level CLIP BPE vocabulary with a few merges: vocab.json + merges.txt."""
  import json
  os.makedirs(folder, exist_ok=True)
  letters = 'abcdefghijklmnopqrstuvwxyz'
  merges = ['r e', 'e d</w>', 'c i', 'ci r', 'l e</w>', 'o n</w>', 'a n</w>', 't h', 'th e</w>']
  tokens = (['<|startoftext|>', '<|endoftext|>'] + list(letters) + [c + '</w>' for c in letters]
            + [m.replace(' ', '') for m in merges])
  with open(os.path.join(folder, 'vocab.json'), 'w') as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(folder, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
  return len(tokens)


@pytest.fixture(scope='session')
def tiny_sd_dir(tmp_path_factory):
  """A random tiny `StableDiffusionPipeline` (DDIM, SD 1.x schedule) saved with save_pretrained."""
  import diffusers
  import torch
  import transformers
  torch.set_num_threads(1)  # Tiny models: threads only contend on the shared cores.
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp('tiny_sd')
  vocab_size = _write_tiny_clip_vocab(str(root / 'vocab'))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / 'vocab'), model_max_length=77)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1,
      **TINY_SD['text_encoder'])).eval()
  unet = diffusers.UNet2DConditionModel(**TINY_SD['unet']).eval()
  vae = diffusers.AutoencoderKL(**TINY_SD['vae']).eval()
  with torch.no_grad():  # Perturb every tensor (norm affines and zero-init layers included).
    for model in (text_encoder, unet, vae):
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False,
      set_alpha_to_one=False, steps_offset=1)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  folder = str(root / 'pipeline')
  pipe.save_pretrained(folder)
  return folder


@pytest.fixture(scope='session')
def tiny_converted_dir(tiny_sd_dir, tmp_path_factory):
  """`tiny_sd_dir` converted by `python -m magicvideo_jax.convert` (run in-process)."""
  from magicvideo_jax import convert as convert_cli  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path_factory.mktemp('tiny_converted') / 'checkpoint')
  convert_cli.main(['--diffusers_dir', tiny_sd_dir, '--output', folder,
                    '--num_frames', str(TINY_SD_FRAMES)])
  return folder
