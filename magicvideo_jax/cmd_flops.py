r"""FLOPs in CMD's convention (Yu et al., ICLR 2024, arXiv 2403.14148, App. D), for CMD and MagicVideo.

  python -m magicvideo_jax.cmd_flops --config=configs/cmd.py:sd21_512x1024 --json [--steps 100]
  python -m magicvideo_jax.cmd_flops --config=configs/sd15_256.py --json

The convention (fvcore's, as CMD counts):
- Only linear and convolution layers, as multiply-adds, and 1 multiply-add = 1 FLOP (XLA and
  `magicvideo_jax.flops` count 2). Attention's QK^T and AV are not counted (CMD runs fused attention
  kernels, which fvcore does not see); nor are norms, activations, softmax or residual adds.
- A conv counts every kernel tap of every output, padding included (fvcore multiplies the kernel size
  by the output size); XLA and `flops.py` count only taps inside the input. Both are reported:
  `per_clip` (fvcore taps) and `per_clip_valid_taps`.
- One network evaluation per sampling step (no classifier-free guidance doubling), the same step count
  for the content U-Net and the motion DiT, the SD VAE decoder (latents -> pixels) and text encoding
  excluded. CMD per clip = steps x (content U-Net + motion DiT) + the CMD autoencoder's decoder;
  MagicVideo per clip = steps x the video U-Net on the clip's frames.

Geometry of a 16 x 512 x 1024 clip: SD latents [16, 64, 128, 4]; autoencoder patch 2 -> 16 x 32 x 64
tokens; z_m [16, 32 + 64, 8] seen by the DiT as a 16 x 96 image with patch 2 -> 8 x 48 = 384 motion
tokens; z_c 64 x 128 with kp 8 -> 128 content tokens.

Training forwards: one forward of each network on one clip (autoencoder: encoder + decoder; content
U-Net: one content frame; motion DiT: one z_m with its z_c). App. D's training figures (0.77, 0.34,
0.14 TFLOPs) match these at 512 x 512 clips (64 x 64 latents), not at 512 x 1024 (about 2x), so
configs/cmd.py sets `flops.train_size` = (512, 512); `train_forward_at_clip_size` gives the others.

Library: `MacTally`, `unet_macs`, `motion_dit_macs`, `cmd_encoder_macs`, `cmd_decoder_macs`,
`cmd_report(config, steps=None) -> dict`.
"""

import functools
import json
import sys
import types
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
from ml_collections import config_flags
import ml_collections

from magicvideo_jax import config as config_lib
from magicvideo_jax.models import cmd as cmd_lib

CONVENTION = ('CMD / fvcore: 1 multiply-add = 1 FLOP; linear and conv layers only (attention QK^T '
              'and AV, norms, activations not counted); conv taps over the padded input; one network '
              'evaluation per step (no CFG doubling); SD VAE decoder and text encoder excluded.')
# CMD App. D, sd21_512x1024 (16 x 512 x 1024), TFLOPs.
PUBLISHED = dict(per_clip_50_steps=46.83e12, per_clip_100_steps=92.1e12,
                 train_autoencoder=0.77e12, train_content=0.34e12, train_motion=0.14e12)


class MacTally:
  """Multiply-adds by category: 'conv', 'dense'; 'attention' (QK^T + AV) is kept aside, not counted.

  `taps`: 'full' (fvcore: every kernel tap, padding included) or 'valid' (XLA: taps inside the input).
  """

  def __init__(self, taps: str = 'full'):
    if taps not in ('full', 'valid'):
      raise ValueError(f"taps must be 'full' or 'valid', got {taps!r}")
    self.taps = taps
    self.macs = {'conv': 0, 'dense': 0, 'attention': 0}

  def conv(self, n: int, h: int, w: int, cin: int, cout: int, kernel: int = 3, stride: int = 1
           ) -> Tuple[int, int]:
    """A conv with padding kernel // 2 over `[n, h, w, cin]`; returns the output (h, w)."""
    p = kernel // 2
    ho, wo = (h + 2 * p - kernel) // stride + 1, (w + 2 * p - kernel) // stride + 1
    if self.taps == 'full':
      taps = ho * wo * kernel * kernel
    else:
      taps = _valid_taps(h, kernel, stride, p) * _valid_taps(w, kernel, stride, p)
    self.macs['conv'] += n * taps * cin * cout
    return ho, wo

  def dense(self, rows: int, din: int, dout: int) -> None:
    self.macs['dense'] += rows * din * dout

  def attention(self, batch: int, q_len: int, k_len: int, width: int) -> None:
    """QK^T and AV over all heads (`width` = heads x head dim): recorded, not in 'total'."""
    self.macs['attention'] += 2 * batch * q_len * k_len * width

  def result(self) -> Dict[str, int]:
    return dict(conv=self.macs['conv'], dense=self.macs['dense'],
                total=self.macs['conv'] + self.macs['dense'],
                attention_not_counted=self.macs['attention'])


def _valid_taps(size: int, kernel: int, stride: int, pad: int) -> int:
  """As flops.valid_taps, mirrored: importing flops.py pulls in the training stack (~20 s)."""
  out = (size + 2 * pad - kernel) // stride + 1
  return sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - pad + k < size)


# ------------------------------------------------------------------------------------------------
# Networks (the structure mirrors flops.analytic_unet_flops and the Linen modules).
# ------------------------------------------------------------------------------------------------


def unet_macs(unet: Any, *, batch: int, frames: int, height: int, width: int, context_len: int,
              use_fps: bool = True, taps: str = 'full') -> Dict[str, int]:
  """The project's U-Net (`config.model.unet`: SD 1.x / 2.x, MagicVideo's video layers if on)."""
  t = MacTally(taps)
  ch = list(unet.block_out_channels)
  levels = len(ch)
  n = batch * frames
  temb = ch[0] * 4
  t.dense(batch, ch[0], temb)
  t.dense(batch, temb, temb)
  if unet.get('fps_embedding', False) and use_fps:
    t.dense(batch, ch[0], temb)
    t.dense(batch, temb, temb)
  temporal = unet.get('temporal_attention', 'none') != 'none'

  def resnet(h, w, cin, cout):
    t.conv(n, h, w, cin, cout)
    t.dense(n, temb, cout)  # time_emb_proj: temb is repeated per frame before it.
    t.conv(n, h, w, cout, cout)
    if cin != cout:
      t.conv(n, h, w, cin, cout, kernel=1)

  def transformer(h, w, c):
    tokens = n * h * w
    t.dense(tokens, c, c)  # proj_in (a 1x1 conv or a Linear: the same multiply-adds)
    for _ in range(4):  # attn1 q, k, v, out
      t.dense(tokens, c, c)
    t.attention(n, h * w, h * w, c)
    t.dense(tokens, c, c)  # attn2 q
    t.dense(n * context_len, unet.cross_attention_dim, 2 * c)  # k, v: the context is per frame
    t.attention(n, h * w, context_len, c)
    t.dense(tokens, c, c)  # attn2 out
    if temporal:
      for _ in range(4):
        t.dense(tokens, c, c)
      t.attention(batch * h * w, frames, frames, c)
    t.dense(tokens, c, 8 * c)  # GEGLU proj
    t.dense(tokens, 4 * c, c)
    t.dense(tokens, c, c)  # proj_out

  h, w = height, width
  t.conv(n, h, w, unet.in_channels, ch[0])
  skips = [ch[0]]
  c = ch[0]
  for i, kind in enumerate(unet.down_block_types):
    for _ in range(unet.layers_per_block):
      resnet(h, w, c, ch[i])
      c = ch[i]
      if kind == 'CrossAttnDownBlock2D':
        transformer(h, w, c)
      skips.append(c)
    if i < levels - 1:
      h, w = t.conv(n, h, w, c, c, stride=2)
      skips.append(c)
  resnet(h, w, c, c)
  transformer(h, w, c)
  resnet(h, w, c, c)
  for i, kind in enumerate(unet.up_block_types):
    level = levels - 1 - i
    for _ in range(unet.layers_per_block + 1):
      resnet(h, w, c + skips.pop(), ch[level])
      c = ch[level]
      if kind == 'CrossAttnUpBlock2D':
        transformer(h, w, c)
    if i < levels - 1:
      h, w = 2 * h, 2 * w
      t.conv(n, h, w, c, c)
  t.conv(n, h, w, c, unet.out_channels)
  return t.result()


def dit_fields(dit: Any) -> Dict[str, Any]:
  """A `model.cmd.dit` section with `size` resolved through `DIT_SIZES` (as `build_motion_dit`)."""
  items = dict(dit.to_dict() if hasattr(dit, 'to_dict') else dit)
  size = items.pop('size', None)
  return dict(cmd_lib.DIT_SIZES[size], **items) if size else items


def motion_dit_macs(dit: Any, *, batch: int, frames: int, motion_len: int, motion_channels: int,
                    content_height: int, content_width: int, content_channels: int,
                    text_dim: int) -> Dict[str, int]:
  """`MotionDiT` on z_m `[B, L, motion_len, D]` with z_c `[B, H, W, C]` and pooled text `[B, T]`."""
  f = dict(dict(mlp_ratio=4, frequency_embedding_size=256), **dit_fields(dit))
  t = MacTally()
  d, p, kp = f['hidden_size'], f['patch_size'], f['content_patch_size']
  motion_tokens = (frames // p) * (motion_len // p)
  tokens = motion_tokens + (content_height // kp) * (content_width // kp)
  t.dense(batch * motion_tokens, p * p * motion_channels, d)  # motion_embed
  t.dense(batch * (tokens - motion_tokens), kp * kp * content_channels, d)  # content_embed
  t.dense(batch, f['frequency_embedding_size'], d)  # time_embedding linear_1, linear_2
  t.dense(batch, d, d)
  t.dense(batch, text_dim, d)  # text_proj
  for _ in range(f['depth']):
    t.dense(batch, d, 6 * d)  # adaLN modulation
    for _ in range(4):  # q, k, v, out
      t.dense(batch * tokens, d, d)
    t.attention(batch, tokens, tokens, d)
    t.dense(batch * tokens, d, f['mlp_ratio'] * d)
    t.dense(batch * tokens, f['mlp_ratio'] * d, d)
  t.dense(batch, d, 2 * d)  # final adaLN (proj_out_1)
  t.dense(batch * motion_tokens, d, p * p * motion_channels)  # proj_out_2: motion tokens only
  return t.result()


def _ae_fields(ae: Any) -> Dict[str, Any]:
  fields = dict(cmd_lib.CMDAutoencoder.__dataclass_fields__)
  defaults = {k: fields[k].default for k in ('width', 'depth', 'patch_size', 'motion_channels',
                                            'content_frame')}
  return dict(defaults, **(ae.to_dict() if hasattr(ae, 'to_dict') else dict(ae)))


def _space_time_blocks(t: MacTally, f: Dict[str, Any], batch: int, frames: int, rows: int,
                       cols: int) -> None:
  c, tokens = f['width'], batch * frames * rows * cols
  for _ in range(f['depth']):
    for _ in range(8):  # time and space attention: q, k, v, out each
      t.dense(tokens, c, c)
    t.attention(batch * rows * cols, frames, frames, c)
    t.attention(batch * frames, rows * cols, rows * cols, c)
    t.dense(tokens, c, 8 * c)  # GEGLU
    t.dense(tokens, 4 * c, c)


def cmd_encoder_macs(ae: Any, *, batch: int, frames: int, height: int, width: int,
                     channels: int) -> Dict[str, int]:
  """`CMDEncoder` on SD latents `[B, L, H, W, C]`."""
  f = _ae_fields(ae)
  t = MacTally()
  p, c, dm = f['patch_size'], f['width'], f['motion_channels']
  rows, cols = height // p, width // p
  tokens = batch * frames * rows * cols
  t.dense(tokens, p * p * channels, c)  # patch_embed
  _space_time_blocks(t, f, batch, frames, rows, cols)
  if f['content_frame'] == 'learned':
    t.dense(tokens, c, p * p * channels)  # content_head: transposed conv, kernel = stride = p
  t.dense(batch * frames * cols, c, dm)  # motion_width (after the mean over rows)
  t.dense(batch * frames * rows, c, dm)  # motion_height
  return t.result()


def cmd_decoder_macs(ae: Any, *, batch: int, frames: int, height: int, width: int,
                     channels: int) -> Dict[str, int]:
  """`CMDDecoder`: (z_c `[B, H, W, C]`, z_m `[B, L, W' + H', D]`) -> `[B, L, H, W, C]`."""
  f = _ae_fields(ae)
  t = MacTally()
  p, c, dm = f['patch_size'], f['width'], f['motion_channels']
  rows, cols = height // p, width // p
  t.dense(batch * rows * cols, p * p * channels, c)  # content_embed, once (broadcast over L)
  t.dense(batch * frames * cols, dm, c)  # motion_width_embed
  t.dense(batch * frames * rows, dm, c)  # motion_height_embed
  _space_time_blocks(t, f, batch, frames, rows, cols)
  t.dense(batch * frames * rows * cols, c, p * p * channels)  # unpatch
  return t.result()


# ------------------------------------------------------------------------------------------------
# Reports.
# ------------------------------------------------------------------------------------------------


def _latent_size(config: ml_collections.ConfigDict) -> Tuple[int, int, int]:
  """(height, width, channels) of a clip's SD latents; `data.width` defaults to square clips."""
  down = 2 ** (len(config.model.vae.block_out_channels) - 1)
  height = config.data.resolution
  width = config.data.get('width', None) or height
  return height // down, width // down, config.model.vae.latent_channels


def _cmd_networks(config: ml_collections.ConfigDict, lh: int, lw: int, lc: int
                  ) -> Dict[str, Dict[str, int]]:
  """Per-forward counts of the four CMD networks on one clip with latents `[L, lh, lw, lc]`."""
  mc, frames = config.model, config.data.num_frames
  p = mc.cmd.autoencoder.get('patch_size', 2)
  clip = dict(batch=1, frames=frames, height=lh, width=lw, channels=lc)
  context = mc.text_encoder.max_position_embeddings
  return dict(
      content=unet_macs(mc.unet, batch=1, frames=1, height=lh, width=lw, context_len=context),
      motion=motion_dit_macs(
          mc.cmd.dit, batch=1, frames=frames, motion_len=lw // p + lh // p,
          motion_channels=mc.cmd.autoencoder.motion_channels, content_height=lh,
          content_width=lw, content_channels=lc, text_dim=mc.unet.cross_attention_dim),
      encoder=cmd_encoder_macs(mc.cmd.autoencoder, **clip),
      decoder=cmd_decoder_macs(mc.cmd.autoencoder, **clip),
      content_valid_taps=unet_macs(mc.unet, batch=1, frames=1, height=lh, width=lw,
                                   context_len=context, taps='valid'))


def _train(nets: Dict[str, Dict[str, int]]) -> Dict[str, int]:
  return dict(autoencoder=nets['encoder']['total'] + nets['decoder']['total'],
              content=nets['content']['total'], motion=nets['motion']['total'])


def cmd_report(config: ml_collections.ConfigDict, steps: Optional[int] = None) -> Dict[str, Any]:
  """Per-clip sampling FLOPs and per-stage training forwards in CMD's convention (module docstring).

  CMD configs (with `model.cmd`): 'per_clip' = steps x (content + motion) + decoder, 'breakdown',
  'per_step', 'train_forward' (at `flops.train_size`, default the clip size),
  'train_forward_at_clip_size', 'published' (App. D) and 'ours_over_published'. Other configs (the
  MagicVideo video U-Net): 'per_clip' = steps x one U-Net forward on the clip.
  """
  steps = steps or config.sampling.num_inference_steps
  lh, lw, lc = _latent_size(config)
  frames = config.data.num_frames
  report: Dict[str, Any] = dict(convention=CONVENTION, steps=steps, frames=frames,
                                resolution=[config.data.resolution,
                                            config.data.get('width', None) or config.data.resolution],
                                latents=[frames, lh, lw, lc])
  if 'cmd' not in config.model:
    if config.model.get('kind', 'magicvideo') not in (None, 'magicvideo'):
      raise ValueError(f'cmd_report counts CMD and MagicVideo configs, not {config.model.kind!r}.')
    context = config.model.text_encoder.max_position_embeddings
    kw = dict(batch=1, frames=frames, height=lh, width=lw, context_len=context)
    fwd = unet_macs(config.model.unet, **kw)
    report.update(model='magicvideo', denoiser_forward=fwd, per_clip=steps * fwd['total'],
                  per_clip_valid_taps=steps * unet_macs(config.model.unet, taps='valid',
                                                        **kw)['total'])
    return report

  nets = _cmd_networks(config, lh, lw, lc)
  per_step = nets['content']['total'] + nets['motion']['total']
  per_clip = steps * per_step + nets['decoder']['total']
  valid = steps * (nets['content_valid_taps']['total'] + nets['motion']['total']) + nets[
      'decoder']['total']
  train_size = tuple(config.get('flops', {}).get('train_size', None) or report['resolution'])
  down = config.data.resolution // lh
  train_nets = _cmd_networks(config, train_size[0] // down, train_size[1] // down, lc)
  report.update(
      model='cmd', per_clip=per_clip, per_clip_valid_taps=valid, per_step=per_step,
      breakdown=dict(content=steps * nets['content']['total'], motion=steps * nets['motion']['total'],
                     ae_decoder=nets['decoder']['total']),
      # Not part of sampling; App. D's two sampling figures fit steps x per_step + this + the decoder.
      ae_encoder=nets['encoder']['total'],
      networks={k: v for k, v in nets.items() if k != 'content_valid_taps'},
      train_size=list(train_size), train_forward=_train(train_nets),
      train_forward_at_clip_size=_train(nets))
  if config.get('flops', {}).get('published', False):
    published = dict(PUBLISHED)
    ours = dict(per_clip_50_steps=50 * per_step + nets['decoder']['total'],
                per_clip_100_steps=100 * per_step + nets['decoder']['total'],
                train_autoencoder=report['train_forward']['autoencoder'],
                train_content=report['train_forward']['content'],
                train_motion=report['train_forward']['motion'])
    report['published'] = published
    report['ours_over_published'] = {k: ours[k] / published[k] for k in published}
    # The two sampling figures also fit with the AE encoder added (a full AE forward per clip).
    report['ours_with_ae_encoder_over_published'] = {
        k: (ours[k] + nets['encoder']['total']) / published[k] for k in published if 'per_clip' in k}
  return report


def format_report(name: str, r: Dict[str, Any]) -> str:
  tf = lambda x: f'{x / 1e12:.3f} TFLOPs'
  lines = [f'== {name} ({r["model"]}): {r["frames"]} x {r["resolution"][0]} x {r["resolution"][1]}, '
           f'{r["steps"]} steps', r['convention'],
           f'  per clip: {tf(r["per_clip"])} (valid conv taps only: {tf(r["per_clip_valid_taps"])})']
  if r['model'] == 'cmd':
    b = r['breakdown']
    lines.append(f'  content {tf(b["content"])}, motion {tf(b["motion"])}, AE decoder '
                 f'{tf(b["ae_decoder"])} (AE encoder, not counted: {tf(r["ae_encoder"])})')
    t, tc = r['train_forward'], r['train_forward_at_clip_size']
    lines.append(f'  training forwards at {r["train_size"][0]}x{r["train_size"][1]}: AE '
                 f'{tf(t["autoencoder"])}, content {tf(t["content"])}, motion {tf(t["motion"])}')
    lines.append(f'  training forwards at the clip size: AE {tf(tc["autoencoder"])}, content '
                 f'{tf(tc["content"])}, motion {tf(tc["motion"])}')
    for k, v in r.get('ours_over_published', {}).items():
      lines.append(f'  {k}: ours / published {v:.4f}')
  return '\n'.join(lines)


def define_flags() -> types.SimpleNamespace:
  """The command-line flags; defined only when run as a program, so importing defines no flags."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file(
          'config', None, 'Config file (configs/cmd.py:VARIANT or a MagicVideo config).',
          lock_config=False),
      json=flags.DEFINE_bool('json', False, 'Print one JSON object instead of text.'),
      steps=flags.DEFINE_integer('steps', None,
                                 'Sampling steps (default config.sampling.num_inference_steps).'))


def main(argv: Sequence[str], f: types.SimpleNamespace) -> None:
  del argv
  if f.config.value is None:
    raise app.UsageError('give --config=configs/cmd.py[:VARIANT] or another config')
  report = cmd_report(f.config.value, steps=f.steps.value)
  if f.json.value:
    print(json.dumps(report, indent=1))
  else:
    print(format_report(flags.FLAGS['config'].config_filename, report))


if __name__ == '__main__':
  sys.argv = config_lib.resolve_config_flag(sys.argv)  # --config=NAME: a shipped config.
  _FLAGS = define_flags()
  app.run(functools.partial(main, f=_FLAGS))
