"""Export to diffusers: the bundled shapes model (`magicvideo_jax/assets/shapes`, trained here) written by
`python -m magicvideo_jax.convert --export_from` (run in-process) is a pipeline folder diffusers loads,
its tokenizer loads in transformers with our ids, its image part samples the image ours does, and its
video layers (`magicvideo_video_layers/`) bring the whole video model back exactly."""

import os

import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

from magicvideo_jax import MagicVideoPipeline  # pylint: disable=g-import-not-at-top
from magicvideo_jax import convert as convert_cli
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import convert
from magicvideo_jax.weights import surgery
from magicvideo_jax.weights import torch_layout

BUNDLE = os.path.join(os.path.dirname(convert.__file__), '..', 'assets', 'shapes')
STEPS, GUIDANCE = 4, 4.0
TOLERANCE = 2e-3  # Max |ours - diffusers| on [0, 1] images, as tests/sampling/test_pipeline.py.
PROMPTS = ('a red circle moving left', 'A Blue STAR, growing!', '', 'a zebra moving up',
           'a red circle a blue square a green star moving left')  # Unknown word; truncated.


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('export') / 'shapes_diffusers')
  convert_cli.main(['--export_from', BUNDLE, '--output', out])
  return out


def flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def test_export_layout_and_round_trip(exported):
  """Every component folder, and export -> import gives back the same config and every parameter."""
  for name in ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler', 'model_index.json',
               os.path.join(convert.VIDEO_LAYERS_DIR, convert.VIDEO_LAYERS_FILE),
               os.path.join(convert.VIDEO_LAYERS_DIR, 'config.json')):
    assert os.path.exists(os.path.join(exported, name)), name
  config, params, tokenizer = ckpt_lib.load_pretrained(BUNDLE)
  back_config, back_params, back_tokenizer = convert.convert_diffusers_folder(exported)
  assert back_config.to_dict() == config.to_dict()
  assert back_tokenizer.vocab == tokenizer.vocab
  ours, back = flat(params), flat(back_params)
  assert sorted(back) == sorted(ours)
  video = [k for k in ours if torch_layout.is_video_only(k)]
  assert len(video) > 100  # Adaptors, temporal attention, fps embedding, VideoVAE layers.
  differ = [k for k in ours if ours[k].dtype != back[k].dtype or not np.array_equal(ours[k], back[k])]
  assert not differ, f'{len(differ)} of {len(ours)} parameters differ: {differ[:5]}'
  print(f'export -> import: {len(ours)} parameters ({len(video)} video-only) identical')


def test_diffusers_tokenizer_gives_our_ids(exported):
  _, _, ours = ckpt_lib.load_pretrained(BUNDLE)
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, 'tokenizer'))
  assert isinstance(theirs, transformers.PreTrainedTokenizerFast)
  assert theirs.model_max_length == ours.max_length
  expected = ours(list(PROMPTS))
  got = theirs(list(PROMPTS), padding='max_length', max_length=theirs.model_max_length,
               truncation=True, return_tensors='np')['input_ids']
  np.testing.assert_array_equal(got, expected)


@pytest.mark.slow  # Over 30 s on 2 cores: a sampler compile and diffusers' pipeline.
def test_diffusers_samples_our_image(exported):
  """diffusers' StableDiffusionPipeline on the export = ours with the video layers at their identity
  init (the image model the export's unet / vae / text_encoder hold), same latents, DDIM, CFG."""
  torch.set_num_threads(1)
  reference = diffusers.DiffusionPipeline.from_pretrained(exported)
  assert isinstance(reference, diffusers.StableDiffusionPipeline)
  assert isinstance(reference.scheduler, diffusers.DDIMScheduler)
  reference.set_progress_bar_config(disable=True)
  config, params, tokenizer = ckpt_lib.load_pretrained(BUNDLE)
  image_params = {name: traverse_util.unflatten_dict(
      {k: v for k, v in flat(group).items() if not torch_layout.is_video_only(k)}, sep='/')
      for name, group in params.items()}
  pipe = MagicVideoPipeline(config, surgery.grow_video_params(config, image_params), tokenizer)
  size = config.data.resolution
  latent = size // pipe.vae_factor
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, 1, latent, latent, pipe.latent_channels)).astype(np.float32)
  prompt = PROMPTS[0]
  with torch.no_grad():
    expected = reference(prompt, latents=torch.from_numpy(latents[:, 0].transpose(0, 3, 1, 2).copy()),
                         num_inference_steps=STEPS, height=size, width=size, output_type='np',
                         guidance_scale=GUIDANCE).images
  ours = pipe(prompt, latents=latents, num_frames=1, height=size, width=size,
              num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type='float')[:, 0]
  err = float(np.abs(ours - expected).max())
  spread = float(expected.std())
  print(f'shapes bundle export: diffusers vs ours ({STEPS} DDIM steps, guidance {GUIDANCE}) '
        f'max abs err {err:.2e} (image std {spread:.3f})')
  assert spread > 0.05  # A real image, so the comparison can fail.
  assert err <= TOLERANCE, f'max abs err {err:.2e} > {TOLERANCE}'
