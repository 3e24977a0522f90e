r"""The built-in default: MagicVideo's recipe in miniature on moving_shapes (16 frames of 32x32).

Stages (each a run of magicvideo_jax.main; launch/train_shapes.sh runs them all):
  vae        the autoencoder on single frames (32x32x3 -> 16x16x4)
  image      text-to-image U-Net + text encoder on single frames, VAE frozen (init_from: vae)
  video      the video stage: frame adaptors + directed temporal attention + fps embedding added to the
             image model and trained with the rest of the U-Net (init_from: image)
  video2 ... video6  warm restarts: each 1500 more steps from the previous video stage's
             result (init_from: video, video2, ...), the learning rate warmed up again: motion,
             still weak after the first 3000 steps, rises with each
  video_layers  the same with MagicVideo's own choice: only the new video layers train
  video_vae  MagicVideo v2's VideoVAE: the decoder with temporal layers, trained on clips (init_from:
             vae); merged into the video model by `python -m magicvideo_jax.weights.checkpoint merge`
  image_long the ablation: the image model alone trained for the steps of image + video + restarts

  python -m magicvideo_jax.main --config=configs/shapes.py:vae --workdir=runs/shapes/vae

The argument is `STAGE[,quick]`: `quick` is the same recipe on the 30-minute budget of 2 CPU cores
(QUICK_STEPS: shorter vae, image and video stages, no restarts; image_long follows it), run by
`QUICK=1 bash launch/train_shapes.sh runs/shapes_quick`. The full recipe (about 2 h 15 min there)
is the one that meets the score targets and made the bundle.
"""

import ml_collections

from magicvideo_jax import config as common

RESTARTS = ('video2', 'video3', 'video4', 'video5', 'video6')
# Steps of each stage; 'restart' is each of RESTARTS. image_long trains image + video + restarts.
STEPS = dict(vae=600, image=1000, video=3000, restart=1500)
# The 30-minute budget (`STAGE,quick`): vae + image + video, no restarts (and no video_vae).
QUICK_STEPS = dict(vae=300, image=500, video=2000, restart=0)
QUICK_STAGES = ('vae', 'image', 'video', 'image_long')
STAGES = ('vae', 'image', 'video') + RESTARTS + ('video_layers', 'video_vae', 'image_long')


def parse_arg(arg: str):
  """'STAGE[,quick]' -> (stage, quick)."""
  stage, *options = (arg or 'video').split(',')
  stage = stage or 'video'
  if stage not in STAGES:
    raise ValueError(f'configs/shapes.py:{stage}: unknown stage; choose one of {STAGES}')
  if any(option != 'quick' for option in options):
    raise ValueError(f'configs/shapes.py:{arg}: the only option is quick, got {options}')
  if options and stage not in QUICK_STAGES:
    raise ValueError(f'configs/shapes.py:{arg}: the quick recipe has the stages {QUICK_STAGES[:-1]} '
                     'and its ablation image_long')
  return stage, bool(options)


def get_config(arg: str = 'video') -> ml_collections.ConfigDict:
  stage, quick = parse_arg(arg)
  steps = QUICK_STEPS if quick else STEPS
  config = common.base_config()
  config.model.text_encoder.update(vocab_size=32, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=8)
  config.model.vae.update(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                          scaling_factor=1.0)
  # Three levels (16x16 -> 8x8 -> 4x4 latents), attention (spatial, cross and temporal) at 8x8
  # and 4x4 only: at 4x4 one temporal-attention position covers a quarter of the frame, so the
  # layers can carry an object from frame to frame; attention at 16x16 would double the step time.
  config.model.unet.update(
      block_out_channels=(32, 64, 96), layers_per_block=1, attention_head_dim=4,
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
      cross_attention_dim=64, norm_num_groups=8, num_frames=16, temporal_position='rope')
  config.model.video_vae.update(num_frames=16)
  config.tokenizer = common.shapes_tokenizer()
  config.data.update(dataset='moving_shapes', split='train', num_frames=16, resolution=32,
                     global_batch_size=8, caption_dropout=0.1, num_threads=2, prefetch=2)
  # Zero terminal SNR with v-prediction, sampled from t = T - 1 ('trailing'). With SD's schedule the
  # last training step still holds 6.8% of the clean latents, from which the model reads where the
  # object is in each frame; pure-noise samples then place it independently in every frame.
  config.diffusion.update(prediction_type='v_prediction', rescale_betas_zero_snr=True,
                          timestep_spacing='trailing', steps_offset=0)
  config.sampling.update(num_inference_steps=25, guidance_scale=4.0)
  config.train.update(log_every=50, checkpoint_every=500, keep_checkpoints=2, warmup_steps=100,
                      learning_rate=1e-3, ema_decay=0.99, sample_every=0,
                      sample_prompts=('a red circle moving left', 'a blue square moving up',
                                      'a yellow star growing', 'a green triangle moving right'))

  if stage == 'vae':
    config.train.update(objective='vae', trainable=('^vae/',), num_steps=steps['vae'], kl_weight=1e-6)
    config.data.update(num_frames=1, global_batch_size=32, caption_dropout=0.0)
  elif stage in ('image', 'image_long'):
    config.model.unet = common.image_only(config.model.unet)
    config.train.update(trainable=('^unet/', '^text_encoder/'),
                        # image_long: the steps of image + video + the restarts.
                        num_steps=steps['image'] if stage == 'image' else
                        steps['image'] + steps['video'] + steps['restart'] * len(RESTARTS),
                        init_from='runs/shapes/vae/model', init_from_include=('^vae/',))
    config.data.update(num_frames=1, global_batch_size=32)
  elif stage in ('video', 'video_layers') + RESTARTS:
    # MagicVideo trains only the new video layers on top of a strong SD model and a frozen CLIP that
    # knows motion words; the miniature's image model is weak and its text encoder never saw motion
    # matter, so both keep training ('video_layers' trains only the new layers).
    # Timesteps drawn logit-normal (median t = 769, a wide spread): the high-noise steps, where the
    # object's place in every frame (hence the motion) is decided, get most of the training.
    config.train.update(num_steps=steps['video'], init_from='runs/shapes/image/model',
                        trainable=('^unet/', '^text_encoder/'), learning_rate=8e-4,
                        timestep_sampling='logit_normal', timestep_logit_mean=1.2,
                        timestep_logit_std=1.5)
    config.data.update(global_batch_size=4)
    if stage in RESTARTS:  # A warm restart: 1500 more steps from the previous stage's weights.
      previous = (('video',) + RESTARTS)[RESTARTS.index(stage)]
      config.train.update(num_steps=steps['restart'], init_from=f'runs/shapes/{previous}/model')
    if stage == 'video_layers':  # MagicVideo's own choice: adaptors, temporal attention, fps only.
      config.train.update(trainable=common.base_config().train.trainable, learning_rate=1e-3)
  elif stage == 'video_vae':
    # Only the VAE matters here, so this stage needs the vae stage alone (it can run beside image
    # and video); `python -m magicvideo_jax.weights.checkpoint merge` puts its decoder into the video model.
    # The whole decoder trains (temporal layers from zero, spatial ones fine-tuned) on clips.
    config.model.video_vae.enabled = True
    config.train.update(objective='video_vae', trainable=(r'^vae/decoder/',), num_steps=400,
                        init_from='runs/shapes/vae/model', init_from_include=('^vae/',),
                        learning_rate=3e-4)
    config.data.update(global_batch_size=4)
  return config
