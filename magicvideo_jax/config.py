"""Every config section's defaults, written once: model at SD 1.x sizes, diffusion, sharding, ...

Each `configs/X.py` starts from `base_config()` and overrides what differs. Keys of the model sections
are the field names of the Linen modules (and, where they exist, of the diffusers / transformers
configs). `fill_defaults(config)` completes a config written before a key existed (an old
checkpoint's config.json, a hand-built section), so library code reads keys without restating
defaults. The optional sections (`OPTIONAL`) are completed only where a config has them.

This module sits below weights/checkpoint (whose `load_config` fills): it imports no module that
imports the checkpoint code, which is why the conditioning, interpolation and upscaler defaults live
here rather than in context.py / sampling/.
"""

import copy
import os
import re
from typing import Any, Callable, Dict, List, Sequence, Tuple

import ml_collections

from magicvideo_jax.data import shapes_vocabulary
from magicvideo_jax.models import clip as clip_lib


def text_encoder_sd15() -> ml_collections.ConfigDict:
  """CLIP ViT-L/14 text transformer (SD 1.x)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=49408,
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      max_position_embeddings=77,
      layer_norm_eps=1e-5,
      hidden_act='quick_gelu',
  ))


def vae_sd15() -> ml_collections.ConfigDict:
  """SD 1.x AutoencoderKL: factor-8 downsampling, 4 latent channels."""
  return ml_collections.ConfigDict(dict(
      in_channels=3,
      out_channels=3,
      latent_channels=4,
      block_out_channels=(128, 256, 512, 512),
      layers_per_block=2,
      norm_num_groups=32,
      scaling_factor=0.18215,
  ))


def unet_sd15() -> ml_collections.ConfigDict:
  """SD 1.x UNet2DConditionModel plus MagicVideo's video extensions (DESIGN.md section 2)."""
  return ml_collections.ConfigDict(dict(
      in_channels=4,
      out_channels=4,
      block_out_channels=(320, 640, 1280, 1280),
      down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                        'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                      'CrossAttnUpBlock2D'),
      layers_per_block=2,
      attention_head_dim=8,  # diffusers' name; in SD 1.x it is the number of heads.
      cross_attention_dim=768,
      norm_num_groups=32,
      norm_eps=1e-5,
      flip_sin_to_cos=True,
      freq_shift=0,
      use_linear_projection=False,
      # Video extensions. num_frames is the largest clip the adaptors support.
      num_frames=16,
      frame_adaptor=True,
      # 'parallel' (MagicVideo), 'sequential' (LaVie), 'animatediff' (motion modules), 'none'.
      temporal_attention='parallel',
      temporal_mask='causal',  # 'causal' (additive), 'causal_post_softmax' (paper), 'none'.
      temporal_position='none',  # 'none' or 'rope' (LaVie: RoPE on the first 32 dims of a head).
      # temporal_attention='animatediff' (AnimateDiff's MotionAdapter config): frame positions known
      # (clips are at most this long), heads (one int, or one per level), transformer blocks per
      # motion module, and whether the mid block has one.
      motion_max_seq_length=32,
      motion_num_attention_heads=8,
      motion_transformer_layers_per_block=1,
      motion_transformer_layers_per_mid_block=1,
      use_motion_mid_block=True,
      fps_embedding=True,
      num_class_embeds=None,  # The SD x4 upscaler's noise-level embedding (sampling/upscaler.py).
      only_cross_attention=False,
  ))


def image_only(unet: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same U-Net with every video extension switched off (the text-to-image model)."""
  unet = ml_collections.ConfigDict(unet.to_dict())
  unet.frame_adaptor = False
  unet.temporal_attention = 'none'
  unet.fps_embedding = False
  return unet


def diffusion_sd15() -> ml_collections.ConfigDict:
  """SD 1.x training schedule and default sampler settings."""
  return ml_collections.ConfigDict(dict(
      num_train_timesteps=1000,
      beta_schedule='scaled_linear',
      beta_start=0.00085,
      beta_end=0.012,
      prediction_type='epsilon',
      timestep_spacing='leading',
      steps_offset=1,
      set_alpha_to_one=False,
      # Zero terminal SNR (Lin et al. 2023): the last training step is pure noise. Needs
      # v_prediction; sample with timestep_spacing='trailing' so that sampling starts there.
      rescale_betas_zero_snr=False,
      # The noise prior of a video model: frames of a clip share sqrt(rho) of their noise (PYoCo's
      # mixed prior; each frame stays N(0, I)), in training and in sampling. 0: i.i.d. frames.
      frame_noise_correlation=0.0,
  ))


def conditioning_defaults() -> ml_collections.ConfigDict:
  """`config.model.conditioning`: the U-Net's context (keys in magicvideo_jax/context.py)."""
  return ml_collections.ConfigDict(dict(kind='text_tokens', source='text', num_tokens=4,
                                        clip_dir='', image_dropout=0.1, image_noise=0.0))


def video_vae_defaults() -> ml_collections.ConfigDict:
  """`config.model.video_vae`: MagicVideo v2's VideoVAE, the SD decoder plus temporal layers
  (models/video_vae.py)."""
  return ml_collections.ConfigDict(dict(enabled=False, num_frames=16, temporal_conv=True,
                                        temporal_attention=True))


def cmd_defaults() -> ml_collections.ConfigDict:
  """`config.model.cmd` of a CMD model (`model.kind = 'cmd'`, models/cmd.py): `autoencoder` and `dit`
  hold `CMDAutoencoder` / `build_motion_dit` fields (their defaults are the modules'); the keys
  here are the ones no module owns."""
  return ml_collections.ConfigDict(dict(
      autoencoder={}, dit={},
      # The EOS id whose final state is the motion DiT's pooled text; None: the largest id (CLIP's).
      eos_token_id=ml_collections.config_dict.placeholder(int),
      motion_scale=1.0,  # z_m times this is what the motion DiT diffuses.
  ))


def clip_defaults() -> ml_collections.ConfigDict:
  """The keys of `config.model.clip` (a CLIP dual encoder, models/clip.py) that have a default; its
  `text`, `vision` and `projection_dim` describe one encoder and have none."""
  return ml_collections.ConfigDict(dict(logit_scale_init_value=clip_lib.LOGIT_SCALE_INIT))


def interpolation_defaults() -> ml_collections.ConfigDict:
  """`config.interpolation` (sampling/interpolation.py): factor m, condition layout, loss weight of
  the keyframes."""
  return ml_collections.ConfigDict(dict(factor=3, condition='nearest', keyframe_loss_weight=1.0))


def image_to_video_defaults() -> ml_collections.ConfigDict:
  """`config.image_to_video` (sampling/image_to_video.py): condition layout, frame 0's loss weight."""
  return ml_collections.ConfigDict(dict(condition='nearest', first_frame_loss_weight=1.0))


def upscaler_defaults() -> ml_collections.ConfigDict:
  """`config.upscaler` as the SD x4 upscaler's (sampling/upscaler.py): its low-res DDPM schedule
  (linear betas 1e-4 -> 0.02), noise levels up to 350, 20 by default at sampling, and sampling from
  pure noise (`strength` 1; below 1 the sampler starts from the upsampled input)."""
  schedule = dict(num_train_timesteps=1000, beta_schedule='linear', beta_start=0.0001,
                  beta_end=0.02, prediction_type='epsilon', timestep_spacing='leading',
                  steps_offset=0, set_alpha_to_one=True)
  return ml_collections.ConfigDict(dict(noise_schedule=schedule, max_noise_level=350,
                                        noise_level=20, strength=1.0))


def logical_axis_rules():
  """Logical axis -> mesh axis. Parameters: FSDP over their output features."""
  return (
      ('batch', ('data', 'fsdp')),
      ('hidden', 'fsdp'),
      ('embed', None),
      ('vocab', None),
      ('frames', None),
      ('norm', None),
      ('kernel_h', None),
      ('kernel_w', None),
      ('kernel_t', None),
      ('length', None),
      ('height', None),
      ('width', None),
      ('channels', None),
  )


def data_defaults() -> ml_collections.ConfigDict:
  """The `config.data` section (keys described in magicvideo_jax/data/input_pipeline.py)."""
  return ml_collections.ConfigDict(dict(
      dataset='',
      data_dir=ml_collections.config_dict.placeholder(str),
      precomputed_latents=False,
      split='train',
      prepare=True,
      global_batch_size=8,
      num_frames=16,
      frame_stride_range=(1, 1),
      resolution=256,
      random_crop=False,
      caption_dropout=0.1,
      caption_fraction=1.0,
      caption_seed=0,
      captioned_only=False,
      num_image_frames=0,
      image_dataset=ml_collections.config_dict.placeholder(str),
      image_split='train',
      seed=0,
      shuffle=True,
      num_epochs=ml_collections.config_dict.placeholder(int),
      num_threads=4,
      prefetch=2,
  ))


def shapes_tokenizer() -> ml_collections.ConfigDict:
  """Word-level tokenizer over the moving_shapes caption vocabulary."""
  words = ('a', 'moving') + tuple(shapes_vocabulary.COLOUR_NAMES) + tuple(shapes_vocabulary.SHAPES) + tuple(
      shapes_vocabulary.MOTIONS)
  return ml_collections.ConfigDict(dict(kind='words', words=words, path=''))


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (SD 1.x model sizes); configs override what differs."""
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      text_encoder=text_encoder_sd15(), vae=vae_sd15(), unet=unet_sd15(),
      dtype='float32',  # Compute dtype: 'bfloat16' on TPU/GPU.
      param_dtype='float32',
      # None / 'xla' (XLA), 'cudnn' (flash where it can run), 'chunked' (query chunks), 'auto'
      # (picked per call: cuDNN, Pallas TPU, chunked for long sequences, XLA); models/attention.py.
      attention_impl=placeholder(str),
      remat=False,
      # U-Net remat policy (models/unet.REMAT_POLICIES): 'none', 'full', 'dots_saveable',
      # 'dots_with_no_batch_dims_saveable', 'offload_dots'; None = 'full' if remat else 'none'.
      remat_policy=placeholder(str),
      video_vae=video_vae_defaults(),
      # The U-Net's context (magicvideo_jax/context.py): 'text_tokens' (SD), or 'clip_embedding'
      # (unsupervised pre-training: a frozen CLIP dual encoder's image (stage 1) or text (stage 2)
      # embedding -> num_tokens context tokens).
      conditioning=conditioning_defaults(),
      clip=None,  # A CLIP dual encoder's architecture (models/clip.py); set from conditioning.clip_dir.
  ))
  config.tokenizer = ml_collections.ConfigDict(dict(kind='clip', path='', words=()))
  config.diffusion = diffusion_sd15()
  config.sampling = ml_collections.ConfigDict(dict(
      sampler='ddim', num_inference_steps=50, guidance_scale=7.5, eta=0.0,
      # DPM-Solver++ with log-SNR-uniform steps matches DDIM-50 in 15-20 steps (tests/test_diffusion.py);
      # diffusers' default spacing does not.
      sigma_spacing='lu_lambdas',
      # DDIM's x0 clipping and DPM-Solver++'s last sigma: as diffusers' schedulers (weights/convert.py).
      clip_sample=False, clip_sample_range=1.0, final_sigmas_type='zero',
      # CMD models: the motion DiT's text guidance (None: guidance_scale).
      motion_guidance_scale=placeholder(float)))
  config.data = data_defaults()
  config.data.fps = 8.0  # Default fps conditioning at sampling time.
  config.train = ml_collections.ConfigDict(dict(
      objective='diffusion',  # A key of losses.LOSSES: 'diffusion', 'vae', 'video_vae', 'clip',
                              # 'interpolation', 'image_to_video', 'upscaler', 'cmd_*'.
      num_steps=1000,
      # Regexes over parameter paths; MagicVideo trains the video layers only.
      # Motion modules' position tables (`pos_embed/pe`) are fixed: left out.
      trainable=(r'^unet/.*(adaptor|temporal)', r'^unet/fps_',
                 r'^unet/.*motion_modules(?!.*/pos_embed/)'),
      learning_rate=1e-4,
      end_lr_factor=0.1,
      warmup_steps=100,
      weight_decay=0.01,
      adam_b1=0.9,
      adam_b2=0.999,
      grad_clip_norm=1.0,
      grad_accum_steps=1,
      ema_decay=0.999,
      # Training timesteps: 'uniform', or 'logit_normal' (t / T = sigmoid(N(mean, std))); a
      # positive mean trains the high-noise steps, where a video's layout and motion form, more.
      timestep_sampling='uniform',
      timestep_logit_mean=0.0,
      timestep_logit_std=1.0,
      image_loss_weight=1.0,  # Joint image-video training: weight of the appended images' loss.
      kl_weight=1e-6,  # 'vae' objective.
      temporal_loss_weight=1.0,  # 'video_vae' objective: weight of the temporal-difference term.
      video_vae_sample_posterior=True,
      init_from=placeholder(str),  # Pretrained folder whose matching weights initialise the model.
      init_from_include=('.*',),  # Regexes: which parameter paths to take from init_from.
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpointing=True,
      sample_every=0,  # Steps between sample videos in workdir/samples (0: never).
      sample_prompts=('a red circle moving left',),
      export=True,  # Write workdir/model (a pretrained folder) at the end.
      export_ema=True,
      # Resume even if the checkpoint's model config differs (its arrays must still fit).
      allow_config_change=False,
      # Profiler trace (TensorBoard's profile tab) of profile_num_steps steps every profile_every
      # steps (0: never), from the first multiple of profile_every after the compile.
      profile_every=0,
      profile_num_steps=5,
  ))
  # Low-rank adapters (magicvideo_jax/lora.py) on the kernels `targets` selects (regexes over
  # parameter paths); rank 0: none. Train them alone with train.trainable=('^lora/',).
  config.lora = ml_collections.ConfigDict(dict(
      rank=0,
      alpha=0.0,  # The adapters' scale is alpha / rank; 0 means alpha = rank.
      targets=(r'^unet/.*/attn[12]/to_(q|k|v|out_0)/kernel$',),
      dropout=0.0,  # Only 0: the adapters are added to the kernels.
  ))
  # Evaluation during training (training/evaluation.py): the objective on the first num_batches
  # batches of `split` at fixed noise and timesteps every `every_steps` steps (0: never), and the
  # checkpoint with the best `best_metric` kept in WORKDIR/checkpoints_best.
  config.eval = ml_collections.ConfigDict(dict(
      every_steps=0,
      split='validation',
      num_batches=2,
      seed=0,
      best_metric='eval_loss',  # Any metric the evaluation writes ('eval_' + the objective's).
      best_mode='min',
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  config.sharding = ml_collections.ConfigDict(dict(logical_axis_rules=logical_axis_rules()))
  return config


# Sections completed only where a config has them (a dotted path -> its defaults). A VDM config
# (configs/vdm_64.py) has neither the SD VAE nor the MagicVideo U-Net.
OPTIONAL: Dict[str, Callable[[], ml_collections.ConfigDict]] = {
    'model.vae': vae_sd15,
    'model.unet': unet_sd15,
    'model.clip': clip_defaults,
    'model.video_vae': video_vae_defaults,
    'model.cmd': cmd_defaults,
    'interpolation': interpolation_defaults,
    'image_to_video': image_to_video_defaults,
    'upscaler': upscaler_defaults,
}


def _lookup(config: ml_collections.ConfigDict, dotted: str):
  for name in dotted.split('.'):
    if not isinstance(config, ml_collections.ConfigDict) or name not in config:
      return None
    config = config[name]
  return config


def _fill(target: ml_collections.ConfigDict, defaults: Dict[str, Any], path: str,
          skip: Tuple[str, ...]) -> None:
  """`defaults`: a `to_dict(preserve_field_references=True)`, so that a placeholder (e.g.
  train.init_from) arrives with its type."""
  for key, value in defaults.items():
    dotted = f'{path}{key}'
    if dotted in skip and isinstance(value, dict):  # None (model.clip's "no encoder") is filled.
      continue
    if key not in target:
      target[key] = copy.deepcopy(value)
    elif isinstance(value, dict) and isinstance(target[key], ml_collections.ConfigDict):
      _fill(target[key], value, dotted + '.', skip)


def fill_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every missing key of every section filled from `base_config()` and,
  where the config has them, of the `OPTIONAL` sections. Set values and unknown keys are kept; the
  copy keeps the config's lock. Idempotent."""
  out = copy.deepcopy(config)
  with out.unlocked():
    _fill(out, base_config().to_dict(preserve_field_references=True), '', tuple(OPTIONAL))
    for dotted, defaults in OPTIONAL.items():
      section = _lookup(out, dotted)
      if isinstance(section, ml_collections.ConfigDict):
        _fill(section, defaults().to_dict(preserve_field_references=True), dotted + '.', ())
  return out


# ------------------------------------------------------------------------------------------------
# Shipped configs by name: `--config=tiny[:ARG]` works from an installed package (the repository's
# configs/ is the package's `magicvideo_jax.configs`).

SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def shipped_config_names() -> Tuple[str, ...]:
  return tuple(sorted(n[:-3] for n in os.listdir(SHIPPED_CONFIGS)
                      if n.endswith('.py') and not n.startswith('_')))


def resolve_config_file(value: str) -> str:
  """`--config`'s value with a shipped config's name (`tiny`, `tiny:ARG`) or a `configs/NAME.py` path
  that does not exist here (run outside the repository) as the shipped file's path; any other value
  (an existing file, a URL, a typo that the flag reports) as it is."""
  file, colon, arg = value.partition(':')
  if '://' in value or os.path.isfile(file):
    return value
  name = file[len('configs/'):] if file.startswith('configs/') else file
  name = name[:-3] if name.endswith('.py') else name
  path = os.path.join(SHIPPED_CONFIGS, f'{name}.py')
  if re.fullmatch(r'\w+', name) and os.path.isfile(path):
    return path + colon + arg
  return value


def resolve_config_flag(argv: Sequence[str], flag: str = 'config') -> List[str]:
  """argv with `--config=VALUE` / `--config VALUE` passed through `resolve_config_file`
  (`--config.key=value` overrides untouched)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f'--{flag}='):
      out[i] = f'--{flag}=' + resolve_config_file(arg[len(flag) + 3:])
    elif arg == f'--{flag}' and i + 1 < len(out):
      out[i + 1] = resolve_config_file(out[i + 1])
  return out
