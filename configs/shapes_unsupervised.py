r"""MagicVideo's unsupervised pre-training in miniature on moving_shapes, with 10% of clips captioned.

Variants (`--config=configs/shapes_unsupervised.py:VARIANT`; launch/train_unsupervised.sh runs them):
  clip         (0) a CLIP-style dual encoder (small ViT on 32x32 frames + small text tower, 64-d
               projections) trained contrastively on (frame, caption) pairs: the 'clip' objective
  text_only    (a) the video model trained on the 10% captioned clips alone, conditioned on the frozen
               dual encoder's text embedding (the same path as stage 2), for the budget of stage1 +
               stage2
  stage1       (b) stage 1: every clip, captions ignored, conditioned on the dual encoder's image
               embedding of a randomly chosen frame
  stage2       (b) stage 2: the 10% captioned clips, conditioned on text embeddings, from stage 1
  text_tokens  (a') like text_only but with the usual text-token conditioning (a text encoder
               trained from scratch on the 10%), for reference
Append ',tiny' (e.g. `stage1,tiny`) for seconds-per-step sizes on moving_shapes/tiny (tests, smoke).

The 10% is `config.data.caption_fraction=0.1` with `caption_seed=0`: the same clips in every variant.
The video models start from the bundled shapes checkpoint's VAE only (trained on frames, no
captions); its U-Net and text encoder, which saw every caption, are not used. Paths assume
RUNS=runs/shapes_unsupervised (the launch script passes them explicitly).

  python -m magicvideo_jax.main --config=configs/shapes_unsupervised.py:clip \
      --workdir=runs/shapes_unsupervised/clip
"""

import ml_collections

from magicvideo_jax.configs import shapes
from magicvideo_jax.configs import tiny

VARIANTS = ('clip', 'text_only', 'stage1', 'stage2', 'text_tokens')
RUNS = 'runs/shapes_unsupervised'
BUNDLED = 'magicvideo_jax/assets/shapes'  # Its VAE initialises the video models.
CAPTION_FRACTION = 0.1
STAGE1_STEPS, STAGE2_STEPS = 3000, 1500


def dual_encoder(size: str) -> ml_collections.ConfigDict:
  """`config.model.clip` of the shapes dual encoder ('shapes': 32x32 frames; 'tiny': 16x16)."""
  small = size == 'tiny'
  width = 32 if small else 64
  return ml_collections.ConfigDict(dict(
      text=dict(vocab_size=64 if small else 32, hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=1 if small else 2, num_attention_heads=4,
                max_position_embeddings=16 if small else 8, layer_norm_eps=1e-5,
                hidden_act='quick_gelu',
                eos_token_id=2),  # The words tokenizer's <eos> (tokenizer.WordTokenizer).
      vision=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1 if small else 3,
                  num_attention_heads=4, num_channels=3, image_size=16 if small else 32,
                  patch_size=4, layer_norm_eps=1e-5, hidden_act='quick_gelu'),
      projection_dim=width,
      logit_scale_init_value=2.6592,
  ))


def get_config(arg: str = 'stage1') -> ml_collections.ConfigDict:
  variant, _, size = (arg or 'stage1').partition(',')
  if variant not in VARIANTS or size not in ('', 'tiny'):
    raise ValueError(f'configs/shapes_unsupervised.py:{arg}: choose one of {VARIANTS}, optionally '
                     'followed by ",tiny"')
  small = size == 'tiny'
  if small:
    config = tiny.get_config('video')
    # One U-Net level and one text layer: compiles in about a third of tiny.py's time.
    config.model.unet.update(block_out_channels=(32,), down_block_types=('CrossAttnDownBlock2D',),
                             up_block_types=('CrossAttnUpBlock2D',))
    config.model.text_encoder.num_hidden_layers = 1
    config.data.global_batch_size = 8
  else:
    config = shapes.get_config('video')  # Batch 4, as its video stage.
    config.train.update(log_every=50, checkpoint_every=500, learning_rate=1e-3, warmup_steps=200)
  config.train.update(init_from=None if small else BUNDLED, init_from_include=('^vae/',),
                      trainable=('^unet/',))
  clip_dir = f'{RUNS}/clip/model'
  fraction = dict(caption_fraction=CAPTION_FRACTION, caption_seed=0)

  if variant == 'clip':
    config.model.clip = dual_encoder(size or 'shapes')
    config.train.update(objective='clip', trainable=('^clip/',), init_from=None,
                        num_steps=20 if small else 1500, learning_rate=1e-3, weight_decay=0.1,
                        warmup_steps=5 if small else 200, ema_decay=0.99)
    # One random frame per clip; every caption (CLIP stands in for a model trained on other
    # image-text data, and single frames say nothing about motion anyway).
    config.data.update(num_frames=1, global_batch_size=16 if small else 128, caption_dropout=0.0)
  elif variant in ('text_only', 'stage2'):
    config.model.conditioning.update(kind='clip_embedding', source='text', clip_dir=clip_dir)
    config.data.update(captioned_only=True, **fraction)
    if variant == 'text_only':
      config.train.num_steps = 20 if small else STAGE1_STEPS + STAGE2_STEPS
    else:
      config.train.update(num_steps=20 if small else STAGE2_STEPS, learning_rate=5e-4,
                          init_from=f'{RUNS}/stage1/model', init_from_include=('.*',))
  elif variant == 'stage1':
    config.model.conditioning.update(kind='clip_embedding', source='image', clip_dir=clip_dir,
                                     image_dropout=0.1)
    config.data.update(**fraction)  # Captions are ignored; most are gone anyway.
    config.train.num_steps = 20 if small else STAGE1_STEPS
  elif variant == 'text_tokens':  # Today's conditioning: a text encoder trained from scratch.
    config.data.update(captioned_only=True, **fraction)
    config.train.update(trainable=('^unet/', '^text_encoder/'),
                        num_steps=20 if small else STAGE1_STEPS + STAGE2_STEPS)
  if small:
    config.train.update(log_every=5, checkpoint_every=10)
  return config

