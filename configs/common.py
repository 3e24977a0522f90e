"""Pieces shared by every config: model defaults at SD 1.x sizes, diffusion, sharding.

Each `configs/X.py` starts from these and overrides what differs. Keys of the model sections are the
field names of the Linen modules (and, where they exist, of the diffusers / transformers configs).
"""

import ml_collections


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
      temporal_attention='parallel',  # 'parallel' (MagicVideo), 'sequential' (LaVie), 'none'.
      temporal_mask='causal',  # 'causal' (additive), 'causal_post_softmax' (paper), 'none'.
      temporal_position='none',  # 'none' or 'rope' (LaVie: RoPE on the first 32 dims of a head).
      fps_embedding=True,
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


def shapes_tokenizer() -> ml_collections.ConfigDict:
  """Word-level tokenizer over the moving_shapes caption vocabulary."""
  from data import moving_shapes  # pylint: disable=g-import-not-at-top
  words = ('a', 'moving') + tuple(moving_shapes.COLOUR_NAMES) + tuple(moving_shapes.SHAPES) + tuple(
      moving_shapes.MOTIONS)
  return ml_collections.ConfigDict(dict(kind='words', words=words, path=''))


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (SD 1.x model sizes); configs override what differs."""
  from data import input_pipeline  # pylint: disable=g-import-not-at-top
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
      # MagicVideo v2's VideoVAE: the SD decoder plus temporal layers (models/video_vae.py).
      video_vae=dict(enabled=False, num_frames=16, temporal_conv=True, temporal_attention=True),
      # The U-Net's context (magicvideo_jax/context.py): 'text_tokens' (SD), or 'clip_embedding'
      # (unsupervised pre-training: a frozen CLIP dual encoder's image (stage 1) or text (stage 2)
      # embedding -> num_tokens context tokens).
      conditioning=dict(kind='text_tokens', source='text', num_tokens=4, clip_dir='',
                        image_dropout=0.1),
      clip=None,  # A CLIP dual encoder's architecture (models/clip.py); set from conditioning.clip_dir.
  ))
  config.tokenizer = ml_collections.ConfigDict(dict(kind='clip', path='', words=()))
  config.diffusion = diffusion_sd15()
  config.sampling = ml_collections.ConfigDict(dict(
      sampler='ddim', num_inference_steps=50, guidance_scale=7.5, eta=0.0,
      # DPM-Solver++ with log-SNR-uniform steps matches DDIM-50 in 15-20 steps (tests/test_diffusion.py);
      # diffusers' default spacing does not.
      sigma_spacing='lu_lambdas'))
  config.data = input_pipeline.default_config()
  config.data.fps = 8.0  # Default fps conditioning at sampling time.
  config.train = ml_collections.ConfigDict(dict(
      objective='diffusion',  # A key of train.LOSSES: 'diffusion', 'vae', 'video_vae', 'clip',
                              # 'interpolation', 'upscaler'.
      num_steps=1000,
      # Regexes over parameter paths; MagicVideo trains the video layers only.
      trainable=(r'^unet/.*(adaptor|temporal)', r'^unet/fps_'),
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
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  config.sharding = ml_collections.ConfigDict(dict(logical_axis_rules=logical_axis_rules()))
  return config
