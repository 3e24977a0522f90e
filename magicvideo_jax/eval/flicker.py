"""Flicker and PSNR of reconstructed clips, and the image-VAE vs VideoVAE decoder comparison.

Scale: every metric is computed on the [0, 1] pixel scale. Inputs are in `value_range` (default
(-1, 1), the models' scale) and are mapped to [0, 1] and clipped there, as when frames are saved.

  flicker(recon, target)   mean over t of mean |e[t+1] - e[t]|, e = recon - target: frame-to-frame
                           change of the reconstruction error (0 when the error is static, however
                           large; the per-frame "dithering" a temporal decoder should remove). It is
                           the temporal term of `video_vae_loss`, on the [0, 1] scale.
  psnr(recon, target)      per-frame PSNR [..., F] (dB, peak 1) and its mean.
  compare_decoders(...)    both decoders on the same latents of held-out clips.
"""

import argparse
from typing import Any, Dict, Optional, Tuple

import einops
import jax
import ml_collections
import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax import models as models_lib
from magicvideo_jax.data import input_pipeline
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.models import vae as vae_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib

_MIN_MSE = 1e-10  # PSNR of a perfect frame: 100 dB, not inf.


def _to_unit(x: Any, value_range: Tuple[float, float]) -> np.ndarray:
  """`x` in `value_range` -> float64 in [0, 1], clipped."""
  low, high = value_range
  return np.clip((np.asarray(x, np.float64) - low) / (high - low), 0.0, 1.0)


def flicker(recon: Any, target: Any, value_range: Tuple[float, float] = (-1.0, 1.0)) -> float:
  """Mean over t of mean |e[t+1] - e[t]|, e = recon - target, on the [0, 1] scale.

  Args:
    recon, target: clips `[..., F, H, W, C]` (F >= 2) in `value_range`.
    value_range: (low, high) of the inputs.
  """
  recon, target = _to_unit(recon, value_range), _to_unit(target, value_range)
  if recon.shape != target.shape or recon.ndim < 4 or recon.shape[-4] < 2:
    raise ValueError(f'flicker needs two clips [..., F >= 2, H, W, C] of one shape, got '
                     f'{recon.shape} and {target.shape}.')
  error = recon - target
  return float(np.mean(np.abs(np.diff(error, axis=-4))))


def psnr(recon: Any, target: Any, value_range: Tuple[float, float] = (-1.0, 1.0)
         ) -> Tuple[np.ndarray, float]:
  """Per-frame PSNR (dB, [0, 1] scale) `[...]` of frames `[..., H, W, C]`, and its mean."""
  recon, target = _to_unit(recon, value_range), _to_unit(target, value_range)
  if recon.shape != target.shape or recon.ndim < 3:
    raise ValueError(f'psnr needs two arrays [..., H, W, C] of one shape, got {recon.shape} and '
                     f'{target.shape}.')
  mse = np.mean(np.square(recon - target), axis=(-3, -2, -1))
  per_frame = 10.0 * np.log10(1.0 / np.maximum(mse, _MIN_MSE))
  return per_frame, float(np.mean(per_frame))


def compare_decoders(image_vae, image_params, video_vae, video_params, clips: Any, *,
                     batch_size: int = 1, value_range: Tuple[float, float] = (-1.0, 1.0),
                     key: Optional[jax.Array] = None) -> Dict[str, Dict[str, Any]]:
  """Flicker and PSNR of the image VAE's and the VideoVAE's decoders on held-out clips.

  Both decoders get the same latents: the image VAE's posterior mean of each frame (or a per-frame
  posterior sample when `key` is given; the VideoVAE's encoder is the same frozen encoder), so only the
  decoders differ. The image decoder decodes frame by frame, the VideoVAE `decode_video` per clip.

  Args:
    image_vae, image_params: an `AutoencoderKL` and its params (the inner `params` tree).
    video_vae, video_params: a `VideoAutoencoderKL` and its params.
    clips: `[N, F, H, W, 3]` in `value_range`, F >= 2 and F <= video_vae.num_frames.
    batch_size: clips per jitted call.
    value_range: (low, high) of `clips` and of the decoders' outputs.
    key: optional PRNG key: decode posterior samples instead of means.

  Returns:
    {'image': {...}, 'video': {...}}, each with 'flicker' (float), 'psnr' (mean, float) and
    'psnr_per_frame' (`[F]`, mean over clips); plus 'target_motion': mean |x[t+1] - x[t]| of the
    clips themselves (the scale against which flicker is small or large).
  """
  clips = np.asarray(clips, np.float32)
  num_clips, num_frames = clips.shape[:2]

  @jax.jit  # Params are arguments, not constants baked into the program.
  def reconstruct(image_params, video_params, x, sample_key):
    frames = einops.rearrange(x, 'b f h w c -> (b f) h w c')
    mean, logvar = image_vae.apply({'params': image_params}, frames, method=image_vae.encode)
    z = mean if sample_key is None else vae_lib.diagonal_gaussian_sample(mean, logvar, sample_key)
    image = image_vae.apply({'params': image_params}, z, method=image_vae.decode)
    image = einops.rearrange(image, '(b f) h w c -> b f h w c', f=num_frames)
    z = einops.rearrange(z, '(b f) h w c -> b f h w c', f=num_frames)
    video = video_vae.apply({'params': video_params}, z, method=video_vae.decode_video)
    return image, video

  image_out, video_out = [], []
  for start in range(0, num_clips, batch_size):
    sample_key = None if key is None else jax.random.fold_in(key, start)
    image, video = reconstruct(image_params, video_params, clips[start:start + batch_size],
                               sample_key)
    image_out.append(np.asarray(image))
    video_out.append(np.asarray(video))
  results = {}
  for name, recon in (('image', np.concatenate(image_out)), ('video', np.concatenate(video_out))):
    per_frame, mean_psnr = psnr(recon, clips, value_range)
    results[name] = dict(flicker=flicker(recon, clips, value_range), psnr=mean_psnr,
                         psnr_per_frame=per_frame.mean(axis=0))
  unit = _to_unit(clips, value_range)
  results['target_motion'] = float(np.mean(np.abs(np.diff(unit, axis=1))))
  return results


def format_comparison(results: Dict[str, Any]) -> str:
  """One line per decoder: flicker (x1e-3, [0, 1] scale) and mean PSNR."""
  lines = [f"clip motion mean|dx/dt| = {results['target_motion'] * 1e3:.2f}e-3"]
  for name in ('image', 'video'):
    r = results[name]
    lines.append(f"{name:>5} decoder: flicker {r['flicker'] * 1e3:.2f}e-3, PSNR {r['psnr']:.2f} dB")
  return '\n'.join(lines)


def load_clips(num_clips: int, dataset: Optional[str] = None, data_dir: Optional[str] = None,
               split: str = 'test', num_frames: Optional[int] = None) -> np.ndarray:
  """`[N, F, H, W, 3]` float32 clips in [-1, 1]: moving_shapes `split` clips (default), or the first
  `num_clips` of a prepared video dataset (a directory or 'name/config' under data_dir), cut to
  `num_frames` frames."""
  if dataset is None:
    shapes_config = moving_shapes.MovingShapesConfig(name='default')
    videos = [moving_shapes.make_example(split, i, shapes_config)['video'] for i in range(num_clips)]
  else:
    source = input_pipeline.load_source(dataset, data_dir=data_dir, split=split)
    videos = [np.asarray(source[i]['video']) for i in range(min(num_clips, len(source)))]
  clips = np.stack([v[:num_frames] for v in videos]).astype(np.float32)
  return clips / 127.5 - 1.0


def main(argv=None) -> int:
  """`python -m magicvideo_jax.eval.flicker --checkpoint DIR`: image decoder vs VideoVAE on held-out
  clips (the checkpoint's `model.video_vae` must be enabled).

  The image decoder is the checkpoint's own spatial decoder unless `--reference` names the folder
  of the image VAE it was trained from (needed when the VideoVAE fine-tuned the whole decoder).
  Clips: moving_shapes test clips, or `--dataset` (e.g. the mp4 clips of magicvideo_jax/tools/compressed_clips.py).
  """
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.flicker',
                                   description=main.__doc__)
  parser.add_argument('--checkpoint', required=True, help='folder with a VideoVAE')
  parser.add_argument('--reference', default=None,
                      help='folder holding the image VAE to compare with (default: --checkpoint)')
  parser.add_argument('--num_clips', type=int, default=64)
  parser.add_argument('--dataset', default=None, help='prepared video dataset (default: shapes)')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--split', default=None, help="default: 'test' (shapes) / 'train' (dataset)")
  parser.add_argument('--json', default=None, help='also write the figures to this file')
  args = parser.parse_args(argv)
  config, params, _ = ckpt_lib.load_pretrained(args.checkpoint)
  if not models_lib.uses_video_vae(config.model):
    raise SystemExit(f'error: {args.checkpoint} has no VideoVAE (config model.video_vae.enabled)')
  plain = config.model.to_dict()
  plain['video_vae']['enabled'] = False
  image_vae = models_lib.build_vae(ml_collections.ConfigDict(plain))
  video_vae = models_lib.build_vae(config.model)
  image_params = params['vae']
  if args.reference:
    image_params = ckpt_lib.load_params(args.reference)['vae']
  split = args.split or ('test' if args.dataset is None else 'train')
  clips = load_clips(args.num_clips, args.dataset, args.data_dir, split,
                     int(config.model.video_vae.num_frames))
  where = args.dataset or 'moving_shapes'
  report = {}
  for name, key in (('posterior mean', None), ('posterior sample', jax.random.key(0))):
    results = compare_decoders(image_vae, image_params, video_vae, params['vae'], clips,
                               batch_size=8, key=key)
    print(f'{name}, {len(clips)} {where} {split} clips:')
    print(format_comparison(results))
    report[name] = {k: (v if k == 'target_motion' else
                        {m: float(x) for m, x in v.items() if m != 'psnr_per_frame'})
                    for k, v in results.items()}
  if args.json:
    eval_lib.write_json(args.json, report)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
