r"""CMD in miniature, measured: the autoencoder's gates, the motion DiT alone, CMD beside MagicVideo.

  python -m magicvideo_jax.eval.cmd --checkpoint runs/cmd_shapes/motion/model \
      [--magicvideo magicvideo_jax/assets/shapes] [--num_clips 64] [--json out.json]

On the first `num_clips` clips of the held-out moving_shapes splits (test: colour-shape-motion
combinations never trained on; validation: trained combinations, unseen clips):
- autoencoder: PSNR against the real frames of the VAE-decoded CMD reconstruction of the clip's
  latents, beside the per-frame VAE round trip (its bound) and the "every frame = the clip's mean
  latent" baseline (what an autoencoder blind to position reaches); the judge on the
  reconstructions (motion: does the decoded motion latent still move the object as captioned).
- motion DiT alone (when the checkpoint has a trained one): the clip's own content frame (the
  encoder's z_c) + generated motion, judged on the clip's caption.
- per generated clip, this checkpoint and `--magicvideo` beside it: FLOPs (XLA's count of one
  network evaluation, times the steps, times 2 with guidance, plus the decoders; the text encoder
  left out, the same for both) and wall-clock seconds (a batch of `batch_size` after a warm call).
Full generation judged on prompts is `python -m magicvideo_jax.eval.shapes --checkpoint ...`.
"""

import argparse
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax import flops as flops_lib
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.eval import judge
from magicvideo_jax.eval import shapes
from magicvideo_jax.eval.image_to_video import psnr
from magicvideo_jax.sampling import request as request_lib
from magicvideo_jax.sampling.pipeline import CMDPipeline, MagicVideoPipeline


def real_clips(split: str, num_clips: int, num_frames: int = 16, resolution: int = 32
               ) -> Tuple[np.ndarray, List[str]]:
  """(`[N, F, H, W, 3]` uint8, captions) of a moving_shapes split's first clips (the default
  config's, rendered at `num_frames` x `resolution`)."""
  config = moving_shapes.MovingShapesConfig(name='default', num_frames=num_frames,
                                            resolution=resolution)
  examples = [moving_shapes.make_example(split, i, config) for i in range(num_clips)]
  captions = [e['caption'].decode() if isinstance(e['caption'], bytes) else str(e['caption'])
              for e in examples]
  return np.stack([e['video'] for e in examples]), captions


def _uint8(frames: np.ndarray) -> np.ndarray:
  return request_lib.to_output(frames, 'uint8')


def _mean_psnr(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean([psnr(x, y) for x, y in zip(a, b)]))


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield slice(start, min(start + size, n))


def autoencoder_scores(pipe: CMDPipeline, videos: np.ndarray, prompts: Sequence[str],
                       batch_size: int = 16) -> Dict[str, float]:
  """PSNRs (dB) of the CMD reconstruction, the VAE round trip and the clip-mean baseline; the
  judge on the reconstructions."""
  recon, round_trip, mean = [], [], []
  for part in _batches(len(videos), batch_size):
    latents = pipe.encode(videos[part].astype(np.float32) / 255.0)
    content, motion = pipe.encode_clip(latents)
    recon.append(_uint8(pipe.decode(pipe.decode_clip(content, motion))))
    round_trip.append(_uint8(pipe.decode(latents)))
    mean.append(_uint8(pipe.decode(np.broadcast_to(latents.mean(1, keepdims=True),
                                                   latents.shape))))
  recon, round_trip, mean = (np.concatenate(x) for x in (recon, round_trip, mean))
  scores = judge.score(recon, prompts)
  scores.pop('judgements', None)
  return dict(psnr=_mean_psnr(recon, videos), psnr_vae_round_trip=_mean_psnr(round_trip, videos),
              psnr_clip_mean=_mean_psnr(mean, videos),
              **{f'judge_{k}': v for k, v in scores.items()})


def dit_alone_scores(pipe: CMDPipeline, videos: np.ndarray, prompts: Sequence[str],
                     batch_size: int = 16, seed: int = 0) -> Dict[str, float]:
  """The judge on real content frames + generated motion latents."""
  out = []
  for part in _batches(len(videos), batch_size):
    content, _ = pipe.encode_clip(pipe.encode(videos[part].astype(np.float32) / 255.0))
    out.append(pipe(list(prompts[part]), content_latents=content, seed=seed + part.start))
  scores = judge.score(np.concatenate(out), prompts)
  scores.pop('judgements', None)
  return scores


def _evaluation_flops(module, params, *args) -> float:
  fn = lambda p, *a: module.apply({'params': p}, *a)
  return flops_lib.xla_flops(fn, params, *args)['flops']


def _decoder_flops(pipe: MagicVideoPipeline, latents: jax.Array) -> float:
  return flops_lib.xla_flops(lambda p, z: pipe._decode_impl(p, z, pipe.video_vae), pipe.params,
                             latents)['flops']


def per_clip_flops(pipe: MagicVideoPipeline) -> Dict[str, float]:
  """FLOPs of one generated clip at the checkpoint's sampling defaults, by network (module
  docstring: XLA's count of one evaluation x steps x 2 with guidance)."""
  config = pipe.config
  steps = int(config.sampling.num_inference_steps)
  guidance = lambda w: 2 if float(w) > 1 else 1
  frames = int(config.data.num_frames)
  side = int(config.data.resolution) // pipe.vae_factor
  context = jnp.zeros((1,) + tuple(pipe.context_shape()), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  unet = pipe.modules['unet']
  unet_frames = 1 if isinstance(pipe, CMDPipeline) else frames
  x = jnp.zeros((1, unet_frames, side, side, pipe.latent_channels), jnp.float32)
  fps = jnp.ones((1,), jnp.float32) if config.model.unet.get('fps_embedding', False) else None
  out = dict(unet=_evaluation_flops(unet, pipe.params['unet'], x, t, context, fps) * steps
             * guidance(config.sampling.guidance_scale))
  clip = jnp.zeros((1, frames, side, side, pipe.latent_channels), jnp.float32)
  if isinstance(pipe, CMDPipeline):
    motion = jnp.zeros((1,) + pipe.motion_shape(), jnp.float32)
    text = jnp.zeros((1, int(config.model.text_encoder.hidden_size)), jnp.float32)
    motion_w = pipe.motion_guidance()
    out['motion_dit'] = _evaluation_flops(pipe.modules['motion_dit'], pipe.params['motion_dit'],
                                          motion, t, clip[:, 0], text) * steps * guidance(motion_w)
    out['cmd_decoder'] = flops_lib.xla_flops(pipe._decode_clip_impl, pipe.params, clip[:, 0],
                                             motion)['flops']
  out['vae_decoder'] = _decoder_flops(pipe, clip)
  out['total'] = sum(out.values())
  return out


def per_clip_seconds(pipe: MagicVideoPipeline, prompts: Sequence[str], seed: int = 0) -> float:
  """Wall-clock seconds per clip of a batch of `prompts`, after a warm call (compiles excluded)."""
  pipe(list(prompts), seed=seed)
  t0 = time.time()
  pipe(list(prompts), seed=seed + 1)
  return (time.time() - t0) / len(prompts)


def evaluate(checkpoint: str, magicvideo: Optional[str] = None, num_clips: int = 64,
             batch_size: int = 16, seed: int = 0) -> Dict[str, Any]:
  pipe = CMDPipeline.from_pretrained(checkpoint)
  results: Dict[str, Any] = dict(checkpoint=checkpoint, num_clips=num_clips)
  size = (pipe.num_frames, pipe.resolution)
  for split in ('test', 'validation'):
    videos, prompts = real_clips(split, num_clips, *size)
    results[f'autoencoder_{split}'] = autoencoder_scores(pipe, videos, prompts, batch_size)
    print(f'autoencoder on {split}: {results[f"autoencoder_{split}"]}', file=sys.stderr)
    # The DiT's output layer starts at zero: only a trained one (the motion stage's) generates.
    if np.any(np.asarray(pipe.params['motion_dit']['proj_out_2']['kernel']) != 0):
      results[f'dit_alone_{split}'] = dit_alone_scores(pipe, videos, prompts, batch_size, seed)
      print(f'motion DiT alone on {split}: {results[f"dit_alone_{split}"]}', file=sys.stderr)
  prompts = shapes.split_prompts('test', batch_size)
  results['cmd_cost'] = dict(flops=per_clip_flops(pipe), seconds=per_clip_seconds(pipe, prompts))
  if magicvideo:
    other = MagicVideoPipeline.from_pretrained(magicvideo)
    results['magicvideo_cost'] = dict(flops=per_clip_flops(other),
                                      seconds=per_clip_seconds(other, prompts))
    results['flops_ratio'] = (results['magicvideo_cost']['flops']['total']
                              / results['cmd_cost']['flops']['total'])
    results['seconds_ratio'] = (results['magicvideo_cost']['seconds']
                                / results['cmd_cost']['seconds'])
  return results


def format_results(r: Dict[str, Any]) -> str:
  lines = [f"CMD {r['checkpoint']} on {r['num_clips']} clips per split"]
  for split in ('test', 'validation'):
    a = r[f'autoencoder_{split}']
    lines.append(f"  autoencoder {split:10s}: PSNR {a['psnr']:.2f} dB (VAE round trip "
                 f"{a['psnr_vae_round_trip']:.2f}, clip mean {a['psnr_clip_mean']:.2f}); judge on "
                 f"reconstructions: colour {a['judge_colour_acc']:.3f} shape {a['judge_shape_acc']:.3f} "
                 f"motion {a['judge_motion_acc']:.3f}")
    if f'dit_alone_{split}' in r:
      d = r[f'dit_alone_{split}']
      lines.append(f"  motion DiT alone {split:10s}: colour {d['colour_acc']:.3f} shape "
                   f"{d['shape_acc']:.3f} motion {d['motion_acc']:.3f} all {d['all_acc']:.3f}")
  for name in ('cmd', 'magicvideo'):
    if f'{name}_cost' in r:
      c = r[f'{name}_cost']
      parts = ', '.join(f'{k} {v / 1e9:.2f}' for k, v in c['flops'].items() if k != 'total')
      lines.append(f"  {name:10s} per clip: {c['flops']['total'] / 1e9:.2f} GFLOPs ({parts}); "
                   f"{c['seconds']:.3f} s")
  if 'flops_ratio' in r:
    lines.append(f"  MagicVideo / CMD: {r['flops_ratio']:.2f}x FLOPs, {r['seconds_ratio']:.2f}x "
                 'seconds per clip')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.cmd', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='a CMD checkpoint folder (or workdir)')
  parser.add_argument('--magicvideo', default=None,
                      help='a MagicVideo checkpoint to compare cost with (e.g. the bundled shapes)')
  parser.add_argument('--num_clips', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='also write the results to this file')
  args = parser.parse_args(argv)
  if args.num_clips < 1 or args.batch_size < 1:
    parser.error('--num_clips and --batch_size must be >= 1')
  try:
    results = evaluate(args.checkpoint, args.magicvideo, args.num_clips, args.batch_size, args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  print(format_results(results))
  if args.json:
    eval_lib.write_json(args.json, results)
  return 0


if __name__ == '__main__':
  sys.exit(main())
