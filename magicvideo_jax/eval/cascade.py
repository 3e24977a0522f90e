r"""The cascade on moving_shapes prompts: judge scores of each stage's video and keyframe fidelity.

  python -m magicvideo_jax.eval.cascade --checkpoint runs/shapes_cascade/cascade --split test \
      --num_prompts 64 [--interpolation DIR --upscaler DIR --fvd --json scores.json]

--checkpoint is a cascade folder (base/, interpolation/, upscaler/) or a base model folder with
--interpolation / --upscaler. For the same prompts and seeds it reports the judge's colour / shape /
motion accuracy and consistency (`magicvideo_jax.eval.judge`) of
  keyframes      the base model's K frames,
  interpolated   the interpolation stage's (K - 1) m + 1 frames,
  cascaded       the super-resolution stage's output (the final video),
  bilinear       the reference SR must beat: the video before SR upsampled bilinearly to its size,
and how well the interpolated clip keeps the keyframes it was given, at the keyframe positions 0, m, 2m...:
  keyframe_latent_mse  mean squared error of the interpolated latents against the keyframe latents
                       (in the interpolation model's latent space),
  keyframe_psnr        PSNR (dB, pixels in [0, 1]) of the decoded interpolated frames against the
                       decoded keyframes,
and, for the super-resolution stage, lowres_psnr: PSNR of its output area-downsampled to the input size
against its input (does SR keep the content?).

With --fvd, also FVD-shapes of each video (`fvd_<name>`) against the split's first N real clips of the
same format (frames, size, frame rate: 46 x 64 px at 24 fps for the cascade's output), both cut into
16-frame windows (`magicvideo_jax.eval.fvd.windows`; 3 per 46-frame clip), beside the real-vs-real
reference of that format (clips [N, 2N)). A row's score is comparable with its own reference only.
"""

import argparse
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax import video_io
from magicvideo_jax.eval import fvd
from magicvideo_jax.eval import judge
from magicvideo_jax.eval import shapes
from magicvideo_jax.sampling import request as request_lib
from magicvideo_jax.sampling import cascade
from magicvideo_jax.sampling import upscaler
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of two arrays of pixels in [0, 1]."""
  mse = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  return float('inf') if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def bilinear_upsample(video: np.ndarray, factor: int) -> np.ndarray:
  """`[B, F, H, W, C]` in [0, 1] -> `[B, F, factor H, factor W, C]`: the upscaler's bilinear
  upsampling (its image-to-image start), clipped to [0, 1]."""
  return np.asarray(upscaler.upsample(video, factor)).clip(0, 1)


def generate(pipe, prompts: Sequence[str], *, batch_size: int = 16, num_frames: Optional[int] = None,
             steps: Optional[int] = None, guidance_scale: Optional[float] = None, seed: int = 0,
             **stage_kwargs) -> Dict[str, np.ndarray]:
  """Runs base -> stages for every prompt (`batch_size` per call). Returns stacked numpy arrays:
  'keyframe_latents', 'keyframes' (decoded by the base, float [0, 1]), and what the stages gave
  ('latents', 'frames', 'upscaled')."""
  fps = request_lib.resolve(pipe.config).fps
  batch_size = min(batch_size, len(prompts))
  parts: Dict[str, List[np.ndarray]] = {}
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    padded = chunk + chunk[-1:] * (batch_size - len(chunk))
    z0 = pipe(padded, num_frames=num_frames, num_inference_steps=steps,
              guidance_scale=guidance_scale, seed=seed + start, fps=fps, output_type='latent',
              interpolate=False, upscale=False)
    out = cascade.run_stages(pipe, z0, padded, [''] * len(padded), seed=seed + start, fps=fps,
                             **stage_kwargs)
    out['keyframe_latents'] = z0
    if 'keyframes' not in out:
      out['keyframes'] = pipe.decode(z0)
    for key, value in out.items():
      if isinstance(value, np.ndarray):
        parts.setdefault(key, []).append(value[:len(chunk)])
  return {key: np.concatenate(values, axis=0) for key, values in parts.items()}


def windowed_fvd(videos: np.ndarray, split: str, fps: float,
                 classifier: Optional[str] = None) -> Dict[str, float]:
  """FVD-shapes of `videos` `[N, T, H, W, 3]` in [0, 1] against the first N real `split` clips of
  their format (T frames of H px at `fps`), in 16-frame windows, and the real-vs-real reference."""
  n, frames, size = videos.shape[:3]
  video_format = dict(num_frames=frames, resolution=size, fps=fps)
  real = fvd.windows(fvd.split_clips(split, 0, n, **video_format)[0])
  other = fvd.windows(fvd.split_clips(split, n, n, **video_format)[0])
  return dict(fvd=fvd.fvd_shapes(real, fvd.windows(video_io.to_uint8(videos)), classifier),
              fvd_real_vs_real=fvd.fvd_shapes(real, other, classifier))


def evaluate(pipe, prompts: Sequence[str], fvd_split: Optional[str] = None,
             **kwargs) -> Dict[str, Any]:
  """Scores (see the module docstring) of the cascade in `pipe` on `prompts`; with `fvd_split` (the
  split the prompts are the first captions of) also each video's windowed FVD-shapes."""
  out = generate(pipe, prompts, **kwargs)
  scores: Dict[str, Any] = {}
  fps = request_lib.resolve(pipe.config).fps
  frame_factor = pipe.interpolator.factor if pipe.interpolator is not None else 1

  def judged(name, video):
    s = judge.score(video, prompts)
    s.pop('judgements', None)
    scores[name] = s
    if fvd_split is not None:
      scores[f'fvd_{name}'] = windowed_fvd(video, fvd_split, fps if name == 'keyframes' else
                                           fps * frame_factor)

  judged('keyframes', out['keyframes'])
  if pipe.interpolator is not None:
    m = pipe.interpolator.factor
    judged('interpolated', out['frames'])
    at_keyframes = out['latents'][:, ::m]
    given = out['keyframe_latents']
    if not cascade.same_vae(pipe.config, pipe.params, pipe.interpolator.config,
                            pipe.interpolator.params):
      given = pipe.interpolator.encode(2.0 * out['keyframes'] - 1.0)
    scores['keyframe_latent_mse'] = float(np.mean(np.square(at_keyframes - given)))
    scores['keyframe_psnr'] = psnr(out['frames'][:, ::m], out['keyframes'])
  if pipe.upscaler is not None:
    judged('cascaded', out['upscaled'])
    factor = out['upscaled'].shape[2] // out['frames'].shape[2]
    # Area averaging (upscaler.downsample, numpy in numpy out): how SR inputs are made in training.
    scores['lowres_psnr'] = psnr(upscaler.downsample(out['upscaled'], factor), out['frames'])
    out['bilinear'] = bilinear_upsample(out['frames'], factor)
    judged('bilinear', out['bilinear'])
  scores['shapes'] = {k: list(v.shape) for k, v in out.items()}
  return scores


def format_scores(scores: Dict[str, Any], title: str) -> str:
  lines = [title]
  for name in ('keyframes', 'interpolated', 'cascaded', 'bilinear'):
    if name in scores:
      shape = scores['shapes'].get({'keyframes': 'keyframes', 'interpolated': 'frames',
                                    'cascaded': 'upscaled', 'bilinear': 'bilinear'}[name])
      lines.append(judge.format_scores(scores[name], f'{name} {shape[1:4] if shape else ""}'))
  for key in ('keyframe_latent_mse', 'keyframe_psnr', 'lowres_psnr'):
    if key in scores:
      lines.append(f'{key:<20} {scores[key]:.4g}')
  for name in ('keyframes', 'interpolated', 'cascaded', 'bilinear'):
    if f'fvd_{name}' in scores:
      value = scores[f'fvd_{name}']
      lines.append(f'FVD-shapes {name:<13} {value["fvd"]:.3f}  (real-vs-real '
                   f'{value["fvd_real_vs_real"]:.3f}, 16-frame windows)')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.cascade', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='cascade folder or base model folder')
  parser.add_argument('--interpolation', default=None)
  parser.add_argument('--upscaler', default=None)
  parser.add_argument('--split', default='test', choices=('train', 'validation', 'test'))
  parser.add_argument('--num_prompts', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--steps', type=int, default=None, help='base sampler steps')
  parser.add_argument('--guidance_scale', type=float, default=None, help='base guidance')
  parser.add_argument('--interpolation_steps', type=int, default=None)
  parser.add_argument('--interpolation_guidance_scale', type=float, default=None)
  parser.add_argument('--upscale_steps', type=int, default=None)
  parser.add_argument('--upscale_guidance_scale', type=float, default=None)
  parser.add_argument('--noise_level', type=int, default=None)
  parser.add_argument('--upscale_strength', type=float, default=None,
                      help='SR from its upsampled input at this strength (default: its config)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--fvd', action='store_true', help='also FVD-shapes of each video against real '
                      'clips of its format')
  parser.add_argument('--json', default=None, help='also write the scores to this file')
  args = parser.parse_args(argv)
  t0 = time.time()
  pipe = MagicVideoPipeline.from_pretrained(args.checkpoint, interpolation=args.interpolation,
                                            upscaler=args.upscaler)
  if pipe.interpolator is None and pipe.upscaler is None:
    parser.error('no cascade stage: pass a cascade folder or --interpolation / --upscaler')
  prompts = shapes.split_prompts(args.split, args.num_prompts)
  scores = evaluate(pipe, prompts, fvd_split=args.split if args.fvd else None,
                    batch_size=args.batch_size, steps=args.steps,
                    guidance_scale=args.guidance_scale, seed=args.seed,
                    interpolation_steps=args.interpolation_steps,
                    interpolation_guidance_scale=args.interpolation_guidance_scale,
                    upscale_steps=args.upscale_steps,
                    upscale_guidance_scale=args.upscale_guidance_scale, noise_level=args.noise_level,
                    upscale_strength=args.upscale_strength)
  print(format_scores(scores, f'{args.checkpoint} on {args.num_prompts} {args.split} prompts'))
  print(f'({time.time() - t0:.0f} s)', file=sys.stderr)
  if args.json:
    eval_lib.write_json(args.json, scores)
  return 0


if __name__ == '__main__':
  sys.exit(main())
