"""Fréchet Video Distance: I3D (Kinetics-400) logits of two sets of videos, and their Fréchet distance.

Protocol (Unterthiner et al. 2018): clips of 16 frames, each frame resized bilinearly to 224 x 224
(half-pixel centres, no antialiasing: `torch.nn.functional.interpolate(mode='bilinear',
align_corners=False)`), values in [-1, 1], the 400 logits of `magicvideo_jax.models.i3d` as features.
FVD is then `frechet_distance` of the two feature sets (it also serves FID on other features).

    variables = fvd.load_i3d('i3d_k400.safetensors')  # python -m magicvideo_jax.weights.i3d ...
    score = fvd.frechet_distance(fvd.i3d_features(real, variables), fvd.i3d_features(fake, variables))

The Fréchet distance is computed in float64 with numpy alone.

FVD-shapes / FID-shapes: the same distance on the 128-d penultimate features of a small classifier
trained on moving_shapes (`models/shapes_classifier.py`, bundled in assets/shapes_classifier), per
clip, or per frame (the net on still clips: `shapes_frame_features`); CLIPSIM-shapes: the mean
text-frame cosine of a dual encoder (`clipsim_shapes`). The command line (`python -m
magicvideo_jax.eval.fvd --help`) scores a checkpoint or two folders of videos.

    score = fvd.fvd_shapes(real_uint8_clips, generated_uint8_clips)
"""

import argparse
import functools
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax import video_io
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.eval import clip_zero_shot
from magicvideo_jax.models import i3d
from magicvideo_jax.models import shapes_classifier
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline
from magicvideo_jax.weights import i3d as i3d_weights

NUM_FRAMES = 16
RESOLUTION = 224


def _moments(features: np.ndarray, name: str):
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'{name}: expected features [N >= 2, D], got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name}: features contain NaN or infinity')
  return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
  """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0: those below numpy's
  `matrix_rank` tolerance (largest * size * eps), negative ones included. (Their square roots,
  ~1e-8 of the scale each, would otherwise add up on rank-deficient covariances.)"""
  tolerance = np.max(np.abs(eigenvalues), initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
  return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix."""
  eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(_psd_eigenvalues(eigenvalues))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Fréchet distance of Gaussians fitted to two feature sets `[N_a, D]`, `[N_b, D]` (float64).

  |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), with unbiased covariances S and
  tr sqrt(S_a S_b) = tr sqrt(sqrt(S_a) S_b sqrt(S_a)): the eigenvalues of symmetric matrices, negative
  ones (and rounding noise, `_psd_eigenvalues`) set to 0, so no complex square root is ever taken
  and N < D stays finite.
  """
  mu_a, cov_a = _moments(features_a, 'features_a')
  mu_b, cov_b = _moments(features_b, 'features_b')
  if mu_a.shape != mu_b.shape:
    raise ValueError(f'feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}')
  sqrt_a = _psd_sqrt(cov_a)
  product = sqrt_a @ cov_b @ sqrt_a
  eigenvalues = _psd_eigenvalues(np.linalg.eigvalsh((product + product.T) / 2))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(eigenvalues)))


def preprocess(videos: Any, num_frames: int = NUM_FRAMES, resolution: int = RESOLUTION):
  """`[B, T, H, W, 3]` uint8 in [0, 255] or floats in [-1, 1] -> `[B, T, 224, 224, 3]` float32 in [-1, 1].

  Bilinear with half-pixel centres and no antialiasing (as the module docstring); T must be
  `num_frames`.
  """
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f'expected videos [B, T, H, W, 3], got shape {videos.shape}')
  if videos.shape[1] != num_frames:
    raise ValueError(f'FVD takes clips of {num_frames} frames, got {videos.shape[1]}')
  if videos.dtype == jnp.uint8:
    x = jnp.asarray(videos, jnp.float32) / 127.5 - 1
  else:
    x = jnp.asarray(videos, jnp.float32)
  batch, frames = x.shape[:2]
  return jax.image.resize(x, (batch, frames, resolution, resolution, 3), method='linear',
                          antialias=False)


@functools.lru_cache(maxsize=None)
def _logits_fn(num_frames: int, resolution: int):
  """Jitted `(variables, videos) -> logits [B, 400]`, built on first use."""
  model = i3d.InceptionI3d()
  return jax.jit(lambda variables, videos: model.apply(
      variables, preprocess(videos, num_frames, resolution)))


def _check_range(batch: np.ndarray) -> None:
  if batch.dtype != np.uint8 and batch.size and (batch.min() < -1.001 or batch.max() > 1.001):
    raise ValueError(f'float videos must lie in [-1, 1], got [{batch.min():.3g}, {batch.max():.3g}]')


def i3d_features(videos: Union[np.ndarray, Iterable[np.ndarray]], variables: Mapping[str, Any],
                 batch_size: int = 8, num_frames: int = NUM_FRAMES,
                 resolution: int = RESOLUTION) -> np.ndarray:
  """I3D logits `[N, 400]` (float32) of videos `[N, T, H, W, 3]` (or an iterable of such batches).

  Batches are padded to `batch_size` so that one program is compiled per frame size.
  """
  batches = [videos] if isinstance(videos, np.ndarray) else videos
  out = []
  for batch in batches:
    batch = np.asarray(batch)
    _check_range(batch)
    for start in range(0, len(batch), batch_size):
      chunk = batch[start:start + batch_size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
      logits = _logits_fn(num_frames, resolution)(variables, padded)
      out.append(np.asarray(logits)[:len(chunk)])
  if not out:
    raise ValueError('no videos given')
  return np.concatenate(out)


def load_i3d(path: str) -> Mapping[str, Any]:
  """I3D variables from safetensors (ours or the PyTorch layout; `magicvideo_jax.weights.i3d`)."""
  return i3d_weights.load_variables(path)


# ------------------------------------------------------------------------------------------------
# FVD-shapes, FID-shapes, CLIPSIM-shapes: the same Fréchet distance on the features of a classifier
# trained on moving_shapes (models/shapes_classifier.py), and a dual encoder's text-frame cosine.

SHAPES_CLASSIFIER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 'assets', 'shapes_classifier')
FID_FRAMES_PER_CLIP = 4


@functools.lru_cache(maxsize=None)
def _shapes_apply(folder: str):
  model, params = shapes_classifier.load(folder)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, shapes_classifier.to_model_input(x))[0])
  return apply, jax.tree.map(jnp.asarray, params)


def _shapes_batch(batch: np.ndarray) -> np.ndarray:
  """Checks a batch `[B, 16, H, W, 3]`; frames of another size are resized to 32 x 32 (as floats)."""
  batch = np.asarray(batch)
  if batch.ndim != 5 or batch.shape[-1] != 3:
    raise ValueError(f'expected videos [B, T, H, W, 3], got shape {batch.shape}')
  if batch.shape[1] != shapes_classifier.NUM_FRAMES:
    raise ValueError(f'FVD-shapes takes clips of {shapes_classifier.NUM_FRAMES} frames, '
                     f'got {batch.shape[1]}')
  _check_range(batch)
  size = shapes_classifier.RESOLUTION
  if batch.shape[2:4] != (size, size):
    x = np.asarray(shapes_classifier.to_model_input(jnp.asarray(batch)))
    batch = np.asarray(jax.image.resize(x, batch.shape[:2] + (size, size, 3), 'linear'))
  return batch


def shapes_features(videos: Union[np.ndarray, Iterable[np.ndarray]],
                    classifier: Optional[str] = None, batch_size: int = 64) -> np.ndarray:
  """Penultimate features `[N, 128]` of the moving_shapes classifier, one per 16-frame clip.

  videos: `[N, 16, H, W, 3]` uint8 or floats in [-1, 1] (or an iterable of such batches).
  classifier: its folder (default: the bundled magicvideo_jax/assets/shapes_classifier).
  """
  apply, params = _shapes_apply(os.path.abspath(classifier or SHAPES_CLASSIFIER))
  batches = [videos] if isinstance(videos, np.ndarray) else videos
  out = []
  for batch in batches:
    batch = _shapes_batch(batch)
    for start in range(0, len(batch), batch_size):
      chunk = batch[start:start + batch_size]
      # Padded to one size: one compiled program.
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
      out.append(np.asarray(apply(params, padded))[:len(chunk)])
  if not out:
    raise ValueError('no videos given')
  return np.concatenate(out)


def still_clips(videos: np.ndarray, frames_per_clip: int = FID_FRAMES_PER_CLIP) -> np.ndarray:
  """`[N * k, T, H, W, 3]`: k evenly spaced frames of each clip, each repeated over the T frames."""
  videos = np.asarray(videos)
  t = videos.shape[1]
  index = np.round(np.linspace(0, t - 1, frames_per_clip)).astype(int)
  frames = videos[:, index].reshape((-1, 1) + videos.shape[2:])
  return np.repeat(frames, t, axis=1)


def shapes_frame_features(videos: Union[np.ndarray, Iterable[np.ndarray]],
                          classifier: Optional[str] = None,
                          frames_per_clip: int = FID_FRAMES_PER_CLIP) -> np.ndarray:
  """Per-frame features `[N * frames_per_clip, 128]`: the same classifier on still clips.

  The video net itself on a clip of one repeated frame, rather than a second 2D network: no second
  model to train and ship, the features live in the same space as FVD-shapes', and a still clip has
  no motion, so only what one frame shows (colour, shape, size, position, background) enters.
  """
  batches = [videos] if isinstance(videos, np.ndarray) else videos
  return shapes_features((still_clips(_shapes_batch(b), frames_per_clip) for b in batches),
                         classifier)


def fvd_shapes(real: np.ndarray, fake: np.ndarray, classifier: Optional[str] = None) -> float:
  """FVD-shapes: Fréchet distance of the classifier's clip features of two sets of videos."""
  return frechet_distance(shapes_features(real, classifier), shapes_features(fake, classifier))


def fid_shapes(real: np.ndarray, fake: np.ndarray, classifier: Optional[str] = None) -> float:
  """FID-shapes: Fréchet distance of the classifier's per-frame (still clip) features."""
  return frechet_distance(shapes_frame_features(real, classifier),
                          shapes_frame_features(fake, classifier))


def clipsim_shapes(videos: np.ndarray, captions: Sequence[str], dual_encoder: str,
                   batch_size: int = 256) -> float:
  """CLIPSIM-shapes: mean cosine between each caption's text embedding and every frame of its video.

  dual_encoder: a CLIP dual encoder folder as `eval.clip_zero_shot.load_encoder` reads it (the export
  of a configs/shapes_unsupervised.py:clip run); frames are resized to its image size there.
  """
  videos = np.asarray(videos)
  if videos.ndim != 5 or len(videos) != len(captions):
    raise ValueError(f'expected videos [N, T, H, W, 3] and N captions, got {videos.shape} and '
                     f'{len(captions)} captions')
  embed_text, embed_frames = clip_zero_shot.load_encoder(dual_encoder)
  text = embed_text(list(captions))
  frames = videos.reshape((-1,) + videos.shape[2:])
  if frames.dtype != np.uint8:  # Floats in [-1, 1], as everywhere in this module.
    frames = np.clip(np.round((frames + 1) * 127.5), 0, 255).astype(np.uint8)
  embedded = []
  for start in range(0, len(frames), batch_size):
    chunk = frames[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    embedded.append(embed_frames(padded)[:len(chunk)])
  frame_embeds = np.concatenate(embedded).reshape(videos.shape[:2] + (-1,))
  return float(np.mean(np.einsum('ntd,nd->nt', frame_embeds, text)))


# ------------------------------------------------------------------------------------------------
# Command line.

PROG = 'python -m magicvideo_jax.eval.fvd'
USAGE = f"""{PROG} --checkpoint CK [--split test --num_videos 64] [--features shapes|i3d]
           [--num_frames {NUM_FRAMES}]
       {PROG} --real_dir A --fake_dir B [--features shapes|i3d]

Scores generated videos against real moving_shapes clips with a Fréchet distance:

  --features shapes  FVD-shapes: penultimate features of the bundled moving_shapes classifier
                     (magicvideo_jax/assets/shapes_classifier, models/shapes_classifier.py); also
                     prints FID-shapes (the same net on still clips of {FID_FRAMES_PER_CLIP} frames a clip).
  --features i3d     FVD-I3D @ 32 px: the Kinetics-400 I3D logits at the shapes resolution (not the
                     published 224 px protocol). Needs --i3d_weights, a safetensors file made with
                       python -m magicvideo_jax.weights.i3d --ckpt i3d-kinetics-400.ckpt \\
                           --output i3d_k400.safetensors   (the public PyTorch I3D weights).

With --checkpoint, the captions of the split's first N clips are generated with
MagicVideoPipeline.from_pretrained(CK) (prompts and seeds only: the checkpoint's sampling defaults) and
scored against those N real clips; --num_frames 16 makes an image checkpoint (one frame) generate its
16 frames independently (the per-frame baseline). With --real_dir / --fake_dir (video files read with
magicvideo_jax.video_io.read_video, 16 frames each, sorted by name), the first n fake videos are
scored against the first n real ones, n = min(#real // 2, #fake).

Beside the score it prints the real-vs-real reference: the same first real sample against a disjoint
one of the same size (clips [N, 2N) of the split; real videos [n, 2n) of --real_dir).
The last line is `fvd <value>`. Errors: one line on stderr, exit status 2.
"""


class UsageError(Exception):
  """A bad flag, a missing folder or file, no videos: one line on stderr and exit status 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def split_clips(split: str, start: int, count: int, **video_format) -> Tuple[np.ndarray, List[str]]:
  """(`[count, T, H, W, 3]` uint8 clips, captions) of moving_shapes `split` from clip `start`;
  `video_format` (num_frames, resolution, fps) as MovingShapesConfig's, default 16 x 32 x 32 at 8 fps."""
  config = moving_shapes.MovingShapesConfig(name='eval', **video_format)
  examples = [moving_shapes.make_example(split, start + i, config) for i in range(count)]
  return np.stack([e['video'] for e in examples]), [e['caption'] for e in examples]


def windows(videos: np.ndarray, length: int = NUM_FRAMES) -> np.ndarray:
  """`[N, T, ...]` -> `[N * W, length, ...]`: W = ceil((T - 1) / (length - 1)) windows per video,
  evenly spaced from frame 0 to the last frame (consecutive windows share at least one frame), so a
  longer video is scored by the 16-frame feature nets window by window."""
  videos = np.asarray(videos)
  frames = videos.shape[1]
  if frames < length:
    raise ValueError(f'videos of {frames} frames are shorter than a window of {length}')
  count = 1 if frames == length else -(-(frames - 1) // (length - 1))
  starts = np.round(np.linspace(0, frames - length, count)).astype(int)
  return np.concatenate([videos[:, s:s + length] for s in starts], axis=1).reshape(
      (-1, length) + videos.shape[2:]) if count > 1 else videos


def read_folder(folder: str) -> np.ndarray:
  """`[N, T, H, W, 3]` uint8: every video file of `folder` (sorted by name)."""
  if not os.path.isdir(folder):
    raise UsageError(f'{folder}: no such folder')
  names = sorted(n for n in os.listdir(folder)
                 if os.path.splitext(n)[1].lower() in video_io.VIDEO_EXTENSIONS)
  if not names:
    raise UsageError(f'{folder}: no video files ({", ".join(video_io.VIDEO_EXTENSIONS)})')
  videos = []
  for name in names:
    try:
      videos.append(video_io.read_video(os.path.join(folder, name)))
    except (OSError, ValueError, RuntimeError) as e:
      raise UsageError(f'{os.path.join(folder, name)}: unreadable: {" ".join(str(e).split())}') from None
  shapes = sorted({v.shape for v in videos})
  if len(shapes) > 1:
    raise UsageError(f'{folder}: videos of different sizes {shapes}')
  return np.stack(videos)


def _batches(videos: np.ndarray, what: str, batch_size: int = 64):
  """Yields batches of `videos`, with progress on stderr."""
  t0 = time.time()
  for start in range(0, len(videos), batch_size):
    yield videos[start:start + batch_size]
    done = min(start + batch_size, len(videos))
    print(f'{what}: {done}/{len(videos)} ({time.time() - t0:.0f} s)', file=sys.stderr, flush=True)


def generate(checkpoint: str, prompts: Sequence[str], batch_size: int = 16, seed: int = 0,
             num_frames: Optional[int] = None) -> np.ndarray:
  """`[N, T, H, W, 3]` uint8 videos of `prompts` (prompts, seeds and `num_frames` only: the
  checkpoint's defaults; `num_frames` None is the checkpoint's length, 1 for an image model)."""
  pipe = MagicVideoPipeline.from_pretrained(checkpoint)
  length = {} if num_frames is None else {'num_frames': num_frames}
  videos, t0 = [], time.time()
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    # Padded to one batch size: one compiled sampler.
    out = pipe(chunk + chunk[-1:] * (batch_size - len(chunk)), seed=seed + start, **length)
    videos.append(np.asarray(out)[:len(chunk)])
    print(f'generating: {start + len(chunk)}/{len(prompts)} ({time.time() - t0:.0f} s)',
          file=sys.stderr, flush=True)
  return np.concatenate(videos)


def score(real: np.ndarray, fake: np.ndarray, reference: Tuple[np.ndarray, np.ndarray],
          features: str, i3d_variables=None, classifier: Optional[str] = None) -> Dict[str, float]:
  """{'fvd', 'fvd_real_vs_real'} (and 'fid', 'fid_real_vs_real' for shapes features)."""
  def extract(videos, what):
    if features == 'i3d':
      return i3d_features(_batches(videos, what), i3d_variables, resolution=32)
    return shapes_features(_batches(videos, what), classifier)

  def frame(videos, what):
    return shapes_frame_features(_batches(videos, what), classifier)

  ref_a, ref_b = reference
  out = dict(fvd=frechet_distance(extract(real, 'features real'), extract(fake, 'features fake')),
             fvd_real_vs_real=frechet_distance(extract(ref_a, 'features reference a'),
                                               extract(ref_b, 'features reference b')))
  if features == 'shapes':
    out['fid'] = frechet_distance(frame(real, 'frame features real'),
                                  frame(fake, 'frame features fake'))
    out['fid_real_vs_real'] = frechet_distance(frame(ref_a, 'frame features reference a'),
                                               frame(ref_b, 'frame features reference b'))
  return out


def _run(argv) -> int:
  parser = _Parser(prog=PROG, usage=USAGE, add_help=True)
  parser.add_argument('--checkpoint', help='a checkpoint folder for MagicVideoPipeline.from_pretrained')
  parser.add_argument('--split', default='test', choices=moving_shapes.SPLITS)
  parser.add_argument('--num_videos', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=16, help='prompts per generation call')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_frames', type=int, default=None,
                      help=f'frames to generate (default: the checkpoint\'s; {NUM_FRAMES} for an '
                      'image model applied per frame)')
  parser.add_argument('--real_dir')
  parser.add_argument('--fake_dir')
  parser.add_argument('--features', default='shapes', choices=('shapes', 'i3d'))
  parser.add_argument('--i3d_weights', help='I3D safetensors (python -m magicvideo_jax.weights.i3d)')
  parser.add_argument('--classifier', default=SHAPES_CLASSIFIER, help='shapes classifier folder')
  parser.add_argument('--clip_checkpoint', help='a dual encoder folder: also CLIPSIM-shapes '
                      '(with --checkpoint)')
  parser.add_argument('--json', help='also write the scores to this file')
  args = parser.parse_args(argv)
  folders = args.real_dir is not None or args.fake_dir is not None
  if folders == (args.checkpoint is not None):
    raise UsageError('give either --checkpoint or both --real_dir and --fake_dir')
  if folders and (args.real_dir is None or args.fake_dir is None):
    raise UsageError('--real_dir and --fake_dir go together')
  if args.num_frames is not None and (folders or args.num_frames != NUM_FRAMES):
    raise UsageError(f'--num_frames goes with --checkpoint and must be {NUM_FRAMES} (FVD takes '
                     f'{NUM_FRAMES} frames), got {args.num_frames}')
  if args.clip_checkpoint and folders:
    raise UsageError('--clip_checkpoint needs --checkpoint (the captions of the split)')
  if args.num_videos < 2 or args.batch_size < 1:
    raise UsageError('--num_videos must be >= 2 and --batch_size >= 1')
  for folder in (args.checkpoint, args.clip_checkpoint, args.real_dir, args.fake_dir):
    if folder is not None and not os.path.isdir(folder):
      raise UsageError(f'{folder}: no such folder')
  i3d_variables = None
  if args.features == 'i3d':
    if not args.i3d_weights:
      raise UsageError('--features i3d needs --i3d_weights (make it with python -m '
                       'magicvideo_jax.weights.i3d)')
    if not os.path.isfile(args.i3d_weights):
      raise UsageError(f'{args.i3d_weights}: no such file')
    i3d_variables = load_i3d(args.i3d_weights)
  elif not os.path.isfile(os.path.join(args.classifier, shapes_classifier.PARAMS_FILE)):
    raise UsageError(f'{args.classifier}: no {shapes_classifier.PARAMS_FILE} (not a shapes classifier)')
  captions = None
  if folders:
    real, fake = read_folder(args.real_dir), read_folder(args.fake_dir)
    if len(real) < 4 or len(fake) < 2:
      raise UsageError(f'need >= 4 real and >= 2 fake videos, got {len(real)} and {len(fake)}')
    # One size n for all: the distance's small-sample bias depends on it (N < 128 dimensions).
    n = min(len(real) // 2, len(fake))
    real, fake, reference = real[:n], fake[:n], (real[:n], real[n:2 * n])
    where = f'first {n} videos of {args.fake_dir} vs first {n} of {args.real_dir}'
    ref_where = f'{args.real_dir} videos [0, {n}) vs [{n}, {2 * n})'
  else:
    n = args.num_videos
    real, captions = split_clips(args.split, 0, n)
    reference = (real, split_clips(args.split, n, n)[0])
    fake = generate(args.checkpoint, captions, args.batch_size, args.seed, args.num_frames)
    where = f'{n} generated vs {n} real {args.split} clips'
    ref_where = f'{args.split} clips [0, {n}) vs [{n}, {2 * n})'
  for name, videos in (('real', real), ('fake', fake)):
    if videos.shape[1] != NUM_FRAMES:
      hint = f' (--num_frames {NUM_FRAMES} for an image checkpoint)' if name == 'fake' and not folders else ''
      raise UsageError(f'{name} videos have {videos.shape[1]} frames; FVD takes {NUM_FRAMES}{hint}')
  scores = score(real, fake, reference, args.features, i3d_variables, args.classifier)
  name = 'FVD-shapes' if args.features == 'shapes' else 'FVD-I3D @ 32 px'
  print(f'{name}: {scores["fvd"]:.3f}  ({where})')
  print(f'  real-vs-real reference: {scores["fvd_real_vs_real"]:.3f}  ({ref_where})')
  if 'fid' in scores:
    print(f'FID-shapes: {scores["fid"]:.3f}  (real-vs-real {scores["fid_real_vs_real"]:.3f}; '
          f'{FID_FRAMES_PER_CLIP} frames a clip)')
  if args.clip_checkpoint:
    scores['clipsim'] = clipsim_shapes(fake, captions, args.clip_checkpoint)
    scores['clipsim_real'] = clipsim_shapes(real, captions, args.clip_checkpoint)
    print(f'CLIPSIM-shapes: {scores["clipsim"]:.4f}  (real clips {scores["clipsim_real"]:.4f})')
  if args.json:
    eval_lib.write_json(args.json, dict(scores, features=args.features, name=name, num_real=len(real),
                     num_fake=len(fake)))
  print(f'fvd {scores["fvd"]:.6g}')
  return 0


def main(argv=None) -> int:
  try:
    return _run(argv)
  except UsageError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
