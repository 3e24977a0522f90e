"""Super-resolution stage (SD x4 upscaler) against diffusers, on tiny random models built offline.

Measured on this machine (float32, CPU):
- The U-Net options the upscaler needs (class-embedded noise level, only-cross-attention levels, a
  DownBlock2D first level, linear projections, 7 input channels) match `UNet2DConditionModel`:
  max rel err 1.0e-6 (bound 1e-4). At full x4-upscaler size (shapes only) the tensor names, shapes
  and count (473,398,020) equal diffusers'.
- A video SR U-Net (LaVie's sequential temporal attention with RoPE, frame adaptors, fps) grown from
  the image upscaler equals it frame by frame at init: max rel err 0 (bound 1e-5); its video layers
  act once trained.
- The whole sampling loop of `magicvideo_jax.upscaler` (noise augmentation, DDIM v-prediction with
  guidance, the f = 4 VAE) on a tiny random `StableDiffusionUpscalePipeline` saved as safetensors and
  converted by our converter equals diffusers' images for the same latents and augmentation noise:
  max abs err 7.7e-6 with guidance, 1.9e-6 without, on [0, 1] images (bound 1e-4).
- Converter: config mapping and an exact diffusers -> ours -> diffusers round trip.
"""

import os
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

from conftest import _write_tiny_clip_vocab  # pylint: disable=g-import-not-at-top
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax import convert as convert_cli
from magicvideo_jax.weights import convert
from magicvideo_jax.weights import torch_layout
from magicvideo_jax import models as models_lib
from magicvideo_jax.sampling import upscaler as upscaler_lib
from magicvideo_jax.models import unet as unet_lib

# The x4 upscaler's U-Net layout at toy width: no attention at the first level, only-cross-attention
# at the next, self + cross attention at the last; context width differs from every channel count so
# that attn1's to_k / to_v shapes tell the two kinds apart.
UNET = dict(in_channels=7, out_channels=4, block_out_channels=(32, 32, 64),
            down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
            up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
            only_cross_attention=(True, True, False), layers_per_block=2, attention_head_dim=4,
            cross_attention_dim=48, norm_num_groups=8, num_class_embeds=1000,
            use_linear_projection=True)
IMAGE = dict(frame_adaptor=False, temporal_attention='none', fps_embedding=False)
SIZE, CONTEXT_LEN = 16, 7  # Low-res (= latent) size; the tiny VAE upsamples by 4 to 64.
STEPS, GUIDANCE, NOISE_LEVEL = 4, 9.0, 20
PROMPTS = ['a red circle', 'the red line']
PIPELINE_TOLERANCE = 1e-4  # Max abs error on [0, 1] images.


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def flat(tree):
  return traverse_util.flatten_dict(nn.unbox(tree), sep='/')


def perturb(*models):
  """Random weights everywhere (norm affines and zero-initialised layers included)."""
  with torch.no_grad():
    for model in models:
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def image_unet():
  """The tiny upscaler U-Net in diffusers and in ours (same weights), and inputs."""
  torch.set_num_threads(1)
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(sample_size=SIZE, **UNET).eval()
  perturb(ref)
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model = unet_lib.UNet(**UNET, **IMAGE)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 1, SIZE, SIZE, 7)).astype(np.float32)
  t = np.array([999, 500, 3], np.int32)
  ctx = rng.standard_normal((3, CONTEXT_LEN, 48)).astype(np.float32)
  labels = np.array([20, 0, 350], np.int32)
  template = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, class_labels=labels)['params']
  params = torch_layout.state_dict_to_params(state, template)
  return types.SimpleNamespace(ref=ref, model=model, params=params, x=x, t=t, ctx=ctx,
                               labels=labels, apply=jax.jit(model.apply))


def test_upscaler_unet_matches_diffusers(image_unet):
  u = image_unet
  leaves = flat(u.params)
  assert leaves['class_embedding/embedding'].shape == (1000, 128)
  # Only-cross-attention at level 1: attn1 reads the 48-wide context; level 2 attends to itself.
  assert leaves['down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_k/kernel'].shape == (48, 32)
  assert leaves['down_blocks_2/attentions_0/transformer_blocks_0/attn1/to_k/kernel'].shape == (64, 64)
  assert leaves['up_blocks_1/attentions_0/transformer_blocks_0/attn1/to_v/kernel'].shape == (48, 32)
  assert leaves['up_blocks_0/attentions_0/transformer_blocks_0/attn1/to_v/kernel'].shape == (64, 64)
  assert leaves['mid_block/attentions_0/transformer_blocks_0/attn1/to_k/kernel'].shape == (64, 64)
  ours = np.asarray(u.apply({'params': u.params}, u.x, u.t, u.ctx, class_labels=u.labels))[:, 0]
  with torch.no_grad():
    ref = u.ref(nchw(u.x[:, 0]), torch.from_numpy(u.t.astype(np.int64)), torch.from_numpy(u.ctx),
                class_labels=torch.from_numpy(u.labels.astype(np.int64))).sample
  ref = ref.numpy().transpose(0, 2, 3, 1)
  err = rel_err(ours, ref)
  print(f'upscaler U-Net (7 in, class-embedded noise level, only-cross mix) vs diffusers: '
        f'max rel err {err:.2e}')
  assert err <= 1e-4
  # The noise level acts (through the class embedding), and a missing one is a clear error.
  other = np.asarray(u.apply({'params': u.params}, u.x, u.t, u.ctx, class_labels=u.labels[::-1]))
  assert rel_err(other[:, 0], ours) > 1e-3
  with pytest.raises(ValueError, match='class_labels'):
    u.model.apply({'params': u.params}, u.x, u.t, u.ctx)


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_video_sr_unet_at_init_is_the_image_upscaler_per_frame(image_unet):
  """LaVie's SR recipe: the upscaler's spatial layers plus temporal layers (here also adaptors and
  fps), zero-initialised: on 3 frames it equals the image upscaler on each frame."""
  u = image_unet
  frames = 3
  model = unet_lib.UNet(**UNET, num_frames=4, temporal_attention='sequential',
                        temporal_position='rope')
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, frames, SIZE, SIZE, 7)).astype(np.float32)
  t, ctx, labels = u.t[:2], u.ctx[:2], u.labels[:2]
  fps = np.array([4.0, 12.0], np.float32)
  params = jax.jit(lambda p, k: unet_lib.init_video_params(
      model, p, k, x, t, ctx, fps, class_labels=labels))(u.params, jax.random.key(1))
  video_only = [p for p in flat(params) if torch_layout.is_video_only(p)]
  assert any('temporal_attn' in p for p in video_only) and any('adaptor' in p for p in video_only)
  apply = jax.jit(model.apply)
  out = np.asarray(apply({'params': params}, x, t, ctx, fps, class_labels=labels))
  per_frame = np.asarray(u.apply(
      {'params': u.params}, x.reshape((2 * frames, 1, SIZE, SIZE, 7)), np.repeat(t, frames),
      np.repeat(ctx, frames, axis=0), class_labels=np.repeat(labels, frames))).reshape(out.shape)
  err = rel_err(out, per_frame)
  print(f'video SR U-Net at init vs image upscaler per frame: max rel err {err:.2e}')
  assert err <= 1e-5
  # Trained video layers do act (the equality above is not a bypass).
  leaves = flat(params)
  moved = {p: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) if p in video_only else v
           for p, v in leaves.items()}
  changed = np.asarray(apply({'params': traverse_util.unflatten_dict(moved, sep='/')}, x, t, ctx,
                             fps, class_labels=labels))
  assert rel_err(changed, per_frame) > 1e-3


# --------------------------------------------------------------------------------------------------
# The whole upscale pipeline.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def upscaler_dir(tmp_path_factory):
  """A random tiny `StableDiffusionUpscalePipeline` (safetensors), laid out like the x4 upscaler:
  DDIM with v-prediction, a DDPM low-res scheduler, a 3-level VAE (f = 4) with scaling 0.08333, a
  GELU CLIP text encoder (as SD 2's OpenCLIP)."""
  torch.set_num_threads(1)
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp('tiny_upscaler')
  vocab_size = _write_tiny_clip_vocab(str(root / 'vocab'))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / 'vocab'), model_max_length=77)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=48,
      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
      hidden_act='gelu')).eval()
  unet = diffusers.UNet2DConditionModel(sample_size=SIZE, **dict(UNET, layers_per_block=1)).eval()
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
      layers_per_block=1, norm_num_groups=8, down_block_types=('DownEncoderBlock2D',) * 3,
      up_block_types=('UpDecoderBlock2D',) * 3, sample_size=4 * SIZE, scaling_factor=0.08333).eval()
  perturb(text_encoder, unet, vae)
  schedule = dict(beta_schedule='scaled_linear', beta_start=0.0001, beta_end=0.02)
  pipe = diffusers.StableDiffusionUpscalePipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
      low_res_scheduler=diffusers.DDPMScheduler(**schedule),
      scheduler=diffusers.DDIMScheduler(**schedule, prediction_type='v_prediction',
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1),
      safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350)
  folder = str(root / 'pipeline')
  pipe.save_pretrained(folder)
  assert not any(n.endswith('.bin') for n in os.listdir(os.path.join(folder, 'unet')))
  return folder


@pytest.fixture(scope='module')
def converted_dir(upscaler_dir, tmp_path_factory):
  """`upscaler_dir` converted by `python -m magicvideo_jax.convert` (in-process), video layers for up
  to 4 frames at identity."""
  folder = str(tmp_path_factory.mktemp('tiny_upscaler_converted') / 'checkpoint')
  convert_cli.main(['--diffusers_dir', upscaler_dir, '--output', folder, '--num_frames', '4'])
  return folder


@pytest.fixture(scope='module')
def pipelines(upscaler_dir, converted_dir):
  reference = diffusers.StableDiffusionUpscalePipeline.from_pretrained(upscaler_dir)
  reference.set_progress_bar_config(disable=True)
  return types.SimpleNamespace(reference=reference,
                               ours=upscaler_lib.VideoUpscaler.from_pretrained(converted_dir))


def test_converted_config(converted_dir):
  config = ckpt_lib.load_config(converted_dir)
  unet = config.model.unet
  assert (unet.in_channels, unet.num_class_embeds, unet.only_cross_attention) == (
      7, 1000, (True, True, False))
  assert unet.use_linear_projection and unet.frame_adaptor and unet.num_frames == 4
  assert config.model.vae.block_out_channels == (16, 32, 32)
  assert config.model.vae.scaling_factor == 0.08333
  assert config.model.text_encoder.hidden_act == 'gelu'
  assert config.diffusion.prediction_type == 'v_prediction' and config.diffusion.steps_offset == 1
  assert config.upscaler.noise_schedule.beta_schedule == 'scaled_linear'
  assert (config.upscaler.max_noise_level, config.upscaler.noise_level) == (350, 20)
  assert (config.sampling.num_inference_steps, config.sampling.guidance_scale) == (75, 9.0)


def run_both(pipelines, guidance_scale, noise_level, negative_prompt=None):
  """2 clips of 2 low-res frames through ours and, as 4 images, through diffusers."""
  clips, frames = len(PROMPTS), 2
  rng = np.random.default_rng(3)
  images = rng.uniform(0, 1, (clips * frames, SIZE, SIZE, 3)).astype(np.float32)
  latents = rng.standard_normal((clips * frames, SIZE, SIZE, 4)).astype(np.float32)
  # diffusers draws the augmentation noise first (the latents are given, so nothing else).
  noise = torch.randn((clips * frames, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
  noise = noise.numpy().transpose(0, 2, 3, 1)
  per_image = [p for p in PROMPTS for _ in range(frames)]
  negatives = None if negative_prompt is None else [negative_prompt] * len(per_image)
  with torch.no_grad():
    expected = pipelines.reference(
        prompt=per_image, image=images, negative_prompt=negatives,
        num_inference_steps=STEPS, guidance_scale=guidance_scale, noise_level=noise_level,
        latents=nchw(latents), generator=torch.Generator().manual_seed(0), output_type='np').images
  clip_shape = lambda a: a.reshape((clips, frames) + a.shape[1:])
  ours = pipelines.ours(clip_shape(2 * images - 1), PROMPTS, negative_prompt,
                        num_inference_steps=STEPS, guidance_scale=guidance_scale,
                        noise_level=noise_level, latents=clip_shape(latents),
                        noise=clip_shape(noise))
  return ours, clip_shape(expected)


@pytest.mark.parametrize('guidance_scale,noise_level,negative_prompt', [
    (GUIDANCE, NOISE_LEVEL, None),  # The pipeline defaults: guidance against "".
    (1.0, 150, 'a circle'),  # No guidance (the negative prompt is then unused).
])
def test_sampling_matches_diffusers_upscale_pipeline(pipelines, guidance_scale, noise_level,
                                                     negative_prompt):
  ours, expected = run_both(pipelines, guidance_scale, noise_level, negative_prompt)
  assert ours.shape == expected.shape == (2, 2, 4 * SIZE, 4 * SIZE, 3)
  err = float(np.abs(ours - expected).max())
  print(f'upscale sampling (guidance {guidance_scale}, noise level {noise_level}, {STEPS} DDIM '
        f'v-prediction steps, 2 clips x 2 frames through the converted video SR U-Net) vs diffusers: '
        f'max abs err {err:.2e} on [0, 1] images')
  assert err <= PIPELINE_TOLERANCE


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_new_levels_and_prompts_do_not_retrace(pipelines):
  ours = pipelines.ours
  low_res = np.random.default_rng(4).uniform(-1, 1, (1, 2, SIZE, SIZE, 3)).astype(np.float32)
  kwargs = dict(num_inference_steps=STEPS, output_type='latent', guidance_scale=GUIDANCE)
  first = ours(low_res, 'a red circle', noise_level=10, **kwargs)
  traces = ours.trace_count
  second = ours(low_res, 'the red line', noise_level=300, seed=1, **dict(kwargs, guidance_scale=4.0))
  assert ours.trace_count == traces
  assert first.shape == (1, 2, SIZE, SIZE, 4) and np.abs(first - second).max() > 1e-3
  with pytest.raises(ValueError, match='max_noise_level'):
    ours(low_res, 'a red circle', noise_level=351, **kwargs)
  with pytest.raises(ValueError, match=r'\[B, F, h, w, 3\]'):
    ours(low_res[0], 'a red circle', **kwargs)
  with pytest.raises(ValueError, match='at most 4'):
    ours(np.concatenate([low_res] * 3, axis=1), 'a red circle', **kwargs)


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_strength_starts_from_the_upsampled_input(pipelines):
  """strength < 1 (image-to-image): one last step from the upsampled input's latents lands near
  them, two steps further, and from pure noise (strength 1) the output is elsewhere (the tiny
  random U-Net's output is large against these latents, scaled by 0.083: hence relative bounds)."""
  ours = pipelines.ours
  rng = np.random.default_rng(5)
  low_res = np.tanh(rng.standard_normal((1, 2, SIZE, SIZE, 3))).astype(np.float32)
  kwargs = dict(num_inference_steps=STEPS, output_type='latent', guidance_scale=1.0)
  upsampled = jax.image.resize(low_res, (1, 2, 4 * SIZE, 4 * SIZE, 3), 'linear')
  start = np.asarray(models_lib.encode_frames(ours.modules['vae'], ours.params['vae'], upsampled,
                                              ours.scaling_factor))
  last_step = ours(low_res, 'a red circle', strength=1 / STEPS, **kwargs)
  from_noise = ours(low_res, 'a red circle', strength=1.0, **kwargs)
  half = ours(low_res, 'a red circle', strength=0.5, **kwargs)
  errors = [rel_err(out, start) for out in (last_step, half, from_noise)]
  print(f'strength 1/{STEPS}, 0.5, 1: max rel err to the upsampled input latents {errors}')
  assert errors[0] < errors[1] < errors[2] and errors[0] < 0.05 * errors[2]
  np.testing.assert_array_equal(from_noise, ours(low_res, 'a red circle', **kwargs))  # Default 1.
  with pytest.raises(ValueError, match='strength'):
    ours(low_res, 'a red circle', strength=0.0, **kwargs)


def test_converter_round_trip(upscaler_dir, converted_dir, tmp_path):
  """diffusers -> ours -> diffusers gives back every tensor; both exports load in diffusers."""
  with_reference = str(tmp_path / 'with_reference')
  convert_cli.main(['--export_from', converted_dir, '--output', with_reference,
                '--reference_dir', upscaler_dir])
  for name in convert.MODEL_FILES:
    original = torch_layout.load_safetensors_folder(os.path.join(upscaler_dir, name))
    exported = torch_layout.load_safetensors_folder(os.path.join(with_reference, name))
    assert sorted(original) == sorted(exported), name
    for key, value in original.items():
      np.testing.assert_array_equal(exported[key], value, err_msg=f'{name}: {key}')
  reloaded = diffusers.StableDiffusionUpscalePipeline.from_pretrained(with_reference)
  assert reloaded.unet.config.num_class_embeds == 1000

  # Without a reference: our configs (class embedding, only-cross levels, low-res schedule).
  plain = str(tmp_path / 'plain')
  convert_cli.main(['--export_from', converted_dir, '--output', plain])
  assert isinstance(diffusers.DiffusionPipeline.from_pretrained(plain),
                    diffusers.StableDiffusionUpscalePipeline)  # model_index.json from our config.
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(plain, 'unet'))
  assert list(unet.config.only_cross_attention) == [True, True, False]
  original = torch_layout.load_safetensors_folder(os.path.join(upscaler_dir, 'unet'))
  for key, value in unet.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), original[key], err_msg=key)
  low_res = diffusers.DDPMScheduler.from_pretrained(plain, subfolder='low_res_scheduler')
  reference = diffusers.DDPMScheduler.from_pretrained(upscaler_dir, subfolder='low_res_scheduler')
  np.testing.assert_array_equal(low_res.alphas_cumprod.numpy(), reference.alphas_cumprod.numpy())


def test_x4_upscaler_unet_sizes():
  """The full stabilityai/stable-diffusion-x4-upscaler U-Net config (shapes only, nothing allocated):
  same tensor names, shapes and parameter count as diffusers'."""
  real = dict(in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024),
              down_block_types=('DownBlock2D',) + ('CrossAttnDownBlock2D',) * 3,
              up_block_types=('CrossAttnUpBlock2D',) * 3 + ('UpBlock2D',), layers_per_block=2,
              attention_head_dim=8, cross_attention_dim=1024, num_class_embeds=1000,
              only_cross_attention=(True, True, True, False), use_linear_projection=True)
  shapes = jax.eval_shape(
      unet_lib.UNet(**real, **IMAGE).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 1, 8, 8, 7), np.float32), jax.ShapeDtypeStruct((1,), np.int32),
      jax.ShapeDtypeStruct((1, 77, 1024), np.float32),
      class_labels=jax.ShapeDtypeStruct((1,), np.int32))['params']
  ours = {torch_layout.flax_path_to_torch_key(p): v.shape for p, v in flat(shapes).items()}
  with torch.device('meta'):
    ref = diffusers.UNet2DConditionModel(sample_size=128, **real)
  theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert sorted(ours) == sorted(theirs)
  for key, shape in theirs.items():  # Kernels are transposed (and conv kernels moved to HWIO).
    assert sorted(ours[key]) == sorted(shape), key
  count = sum(int(np.prod(s)) for s in theirs.values())
  assert sum(int(np.prod(s)) for s in ours.values()) == count
  print(f'x4 upscaler U-Net: {count:,} parameters in ours and in diffusers')
