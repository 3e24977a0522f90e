r"""A LoRA on the bundled shapes model: teach it one colour-shape-motion combination it gets wrong.

The base (default magicvideo_jax/assets/shapes) stays frozen; rank-8 adapters on the U-Net's
spatial, cross and temporal attention projections train alone (`train.trainable=('^lora/',)`) on
a moving_shapes build whose train split draws half its clips from the target combination (a
held-out test combination) and half from the usual train combinations, so that the rest of what
the model can do is rehearsed. benchmarks/lora_shapes.py builds that data, runs this config and
judges the model before and after:

  python -m benchmarks.lora_shapes --workdir runs/lora_shapes

The argument is `[base=DIR]`; the data set is `--config.data.dataset=PATH` (benchmarks/lora_shapes.py
passes the one it built).
"""

import ml_collections

from magicvideo_jax.configs import shapes_cascade

DEFAULT_BASE = shapes_cascade.DEFAULT_BASE
TARGETS = (r'^unet/.*/(attn1|attn2|temporal_attn)/to_(q|k|v|out_0)/kernel$',)


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  config, base = shapes_cascade.finetune_config(arg, 'shapes_lora.py')
  config.lora.update(rank=8, alpha=8.0, targets=TARGETS)
  config.train.update(init_from=base, trainable=('^lora/',), num_steps=300, learning_rate=1e-3,
                      warmup_steps=20, ema_decay=0.0, log_every=25,
                      checkpoint_every=300, keep_checkpoints=1, sample_every=0,
                      timestep_sampling='logit_normal', timestep_logit_mean=1.2,
                      timestep_logit_std=1.5)
  return config
