"""An automatic judge for moving-shapes videos: does a generated clip show what its prompt asked?

From a video `[T, H, W, 3]` (any resolution, uint8 or float in [0, 1]; blur and noise are fine) the
judge segments the one object and reads back
  colour       the palette colour nearest to the object's median colour,
  shape        the most likely class under per-class Gaussians of scale-free mask features (fill
               of the bounding box, solidity, normalised inertia, vertical skew), fitted at first
               use on rendered clips, clean and blurred/noisy,
  motion       'growing' when the area at least doubles while the centroid stays put, otherwise the
               dominant direction of the centroid's displacement ('static' if it barely moves),
  consistency  in [0, 1]: the mean over consecutive frames of the similarity of shape (aligned
               mask IoU), colour, and area and centroid steps relative to the clip's trend; 0 for
               a pair in which either frame has no object (see `consistency`).

  judgement = judge_video(video)              # {'colour': 'red', 'shape': 'circle', ...}
  scores = score(videos, prompts)             # {'colour_acc': ..., 'all_acc': ..., ...}
  print(format_scores(scores, 'test clips'))

The palette, shapes and caption grammar come from `data.moving_shapes`, the dataset it judges.
"""

import functools
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage
from scipy import spatial

from magicvideo_jax.data import moving_shapes

# Pixels count as object when their RGB distance to the background exceeds
# max(_MIN_CONTRAST, _RELATIVE_THRESHOLD * the video's 99th-percentile distance).
_MIN_CONTRAST = 25.0
_RELATIVE_THRESHOLD = 0.5
# A frame shows an object only if the component stands out: its median distance to the background
# colour is >= _MIN_SNR x the median distance of the rest of the frame (plus a floor), and it
# covers at most _MAX_AREA of the frame. Random noise fails this; blurred or noisy objects pass.
_MIN_SNR = 3.0
_SNR_FLOOR = 5.0
_MAX_AREA = 0.5
# 'growing': area ratio (last / first, from the log-area trend) and maximum centroid travel.
_GROW_AREA_RATIO = 2.0
_GROW_MAX_TRAVEL = 0.2
# Below this travel (fraction of the frame) a non-growing object is 'static'.
_STATIC_TRAVEL = 0.08
_FEATURE_NAMES = ('fill', 'solidity', 'inertia', 'skew')
_PALETTE = np.array([moving_shapes.COLOURS[c] for c in moving_shapes.COLOUR_NAMES], np.float64)


# ----------------------------------------------------------------------------------------------
# Segmentation.
# ----------------------------------------------------------------------------------------------
def _as_float_video(video: Any) -> np.ndarray:
  """[T, H, W, 3] float64 in [0, 255] from uint8 or float-in-[0, 1] input."""
  video = np.asarray(video)
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f'Expected a video [T, H, W, 3], got shape {video.shape}.')
  if video.dtype == np.uint8:
    return video.astype(np.float64)
  return np.clip(video.astype(np.float64), 0.0, 1.0) * 255.0


def background_colour(video: np.ndarray) -> np.ndarray:
  """Median RGB [3] of the one-pixel frame border over all frames."""
  border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
  return np.median(border.reshape(-1, 3), axis=0)


def segment(video: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Object masks of a float video [T, H, W, 3] in [0, 255].

  Returns:
    masks bool [T, H, W] (per frame the largest 8-connected component, holes filled; empty when
    it does not stand out from the rest of the frame) and the distance to the background colour
    [T, H, W].
  """
  distance = np.linalg.norm(video - background_colour(video), axis=-1)
  threshold = max(_MIN_CONTRAST, _RELATIVE_THRESHOLD * np.percentile(distance, 99))
  masks = np.zeros(distance.shape, bool)
  eight = np.ones((3, 3), bool)
  for t, frame in enumerate(distance > threshold):
    labels, num = ndimage.label(frame, structure=eight)
    if num:
      sizes = np.bincount(labels.ravel())[1:]
      mask = ndimage.binary_fill_holes(labels == 1 + np.argmax(sizes))
      inside, outside = distance[t][mask], distance[t][~mask]
      if (mask.mean() <= _MAX_AREA and
          np.median(inside) >= _MIN_SNR * (np.median(outside) + _SNR_FLOOR)):
        masks[t] = mask
  return masks, distance


# ----------------------------------------------------------------------------------------------
# Per-frame measurements.
# ----------------------------------------------------------------------------------------------
def _centroid(mask: np.ndarray) -> np.ndarray:
  ys, xs = np.nonzero(mask)
  return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def shape_features(mask: np.ndarray) -> np.ndarray:
  """Scale-free features [4] of a non-empty binary mask [H, W]; see _FEATURE_NAMES.

  fill      area / bounding-box area (square 1, circle 0.79, triangle 0.5, star 0.43)
  solidity  area / convex-hull area of the pixel squares (star ~0.6, the others ~0.9-1)
  inertia   polar moment of inertia / area^2 (circle 0.159, square 0.167, triangle 0.19)
  skew      (centroid - bounding-box centre) / box height, vertically: an upward triangle's
            centroid lies low (+0.17), a star's a little (+0.05), circle and square 0
  """
  ys, xs = np.nonzero(mask)
  area = float(len(xs))
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  fill = area / ((y1 - y0) * (x1 - x0))
  corners = np.concatenate([np.stack([xs + dx, ys + dy], -1) for dx in (0, 1) for dy in (0, 1)])
  try:
    hull_area = spatial.ConvexHull(corners).volume
  except spatial.QhullError:  # Degenerate (a line of pixels).
    hull_area = area
  cx, cy = xs.mean(), ys.mean()
  # Each pixel is a unit square: its own polar inertia is 1/6.
  inertia = (((xs - cx) ** 2 + (ys - cy) ** 2).sum() + area / 6.0) / area ** 2
  skew = (cy + 0.5 - (y0 + y1) / 2.0) / (y1 - y0)
  return np.array([fill, area / hull_area, inertia, skew])


def _clip_shape_features(masks: np.ndarray) -> Optional[np.ndarray]:
  """Median features over the frames whose object is at least half its typical (p90) size."""
  areas = masks.sum(axis=(1, 2))
  if areas.max() < 4:
    return None
  keep = (areas >= 0.5 * np.percentile(areas, 90)) & (areas >= 4)
  return np.median(np.stack([shape_features(m) for m in masks[keep]]), axis=0)


# Degradations the shape classifier is fitted on, as in model samples: (blur sigma in pixels at
# 32x32, noise std in 0-255 units).
_DEGRADATIONS = ((0.0, 0.0), (0.6, 8.0), (1.0, 16.0))


@functools.lru_cache(maxsize=None)
def _shape_prototypes() -> Tuple[np.ndarray, np.ndarray]:
  """Per-class means [S, 4] and standard deviations [S, 4] of clip features.

  Fitted on rendered clips of every shape at three resolutions, clean and degraded by blur and
  noise; deterministic (fixed seed), about a second.
  """
  rng = np.random.default_rng(20221118)
  means, stds = [], []
  for shape in moving_shapes.SHAPES:
    rows = []
    for resolution in (32, 48, 64):
      for i in range(8):
        colour = moving_shapes.COLOUR_NAMES[i % len(moving_shapes.COLOUR_NAMES)]
        motion = moving_shapes.MOTIONS[i % len(moving_shapes.MOTIONS)]
        video, _ = moving_shapes.render_clip(colour, shape, motion, num_frames=4,
                                             resolution=resolution, rng=rng)
        for sigma, noise in _DEGRADATIONS:
          degraded = ndimage.gaussian_filter(
              video.astype(np.float64), (0, sigma * resolution / 32, sigma * resolution / 32, 0))
          degraded = np.clip(degraded + rng.normal(0.0, noise, video.shape), 0.0, 255.0)
          features = _clip_shape_features(segment(degraded)[0])
          if features is not None:
            rows.append(features)
    rows = np.stack(rows)
    means.append(rows.mean(axis=0))
    stds.append(np.maximum(rows.std(axis=0), 1e-3))
  return np.stack(means), np.stack(stds)


def classify_shape(features: np.ndarray) -> str:
  """Most likely shape under per-class diagonal Gaussians of the features [4]."""
  means, stds = _shape_prototypes()
  log_likelihood = -0.5 * (((features - means) / stds) ** 2).sum(axis=1) - np.log(stds).sum(axis=1)
  return moving_shapes.SHAPES[int(np.argmax(log_likelihood))]


def nearest_colour(rgb: np.ndarray) -> str:
  return moving_shapes.COLOUR_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _slope(t: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Least-squares slope of values [N, ...] against times t [N]."""
  t = t - t.mean()
  return np.tensordot(t, values - values.mean(axis=0), axes=1) / (t ** 2).sum()


def classify_motion(present: np.ndarray, centroids: np.ndarray, areas: np.ndarray,
                    size: Tuple[int, int]) -> Tuple[Optional[str], Dict[str, float]]:
  """Motion from the centroid and log-area trends over the frames where the object is present.

  Args:
    present: bool [T]; centroids: float [T, 2] (x, y) pixels; areas: [T] pixels;
      size: (H, W).
  """
  t = np.nonzero(present)[0].astype(np.float64)
  if len(t) < 2:
    return None, {}
  span = float(len(present) - 1)
  dx, dy = _slope(t, centroids[present]) * span / np.array([size[1], size[0]])
  area_ratio = float(np.exp(_slope(t, np.log(areas[present])) * span))
  travel = max(abs(dx), abs(dy))
  if area_ratio >= _GROW_AREA_RATIO and travel < _GROW_MAX_TRAVEL:
    motion = 'growing'
  elif travel < _STATIC_TRAVEL:
    motion = 'static'
  elif abs(dx) >= abs(dy):
    motion = 'right' if dx > 0 else 'left'
  else:
    motion = 'down' if dy > 0 else 'up'
  return motion, {'dx': float(dx), 'dy': float(dy), 'area_ratio': area_ratio}


def consistency(video: np.ndarray, masks: np.ndarray) -> float:
  """Frame-to-frame consistency in [0, 1] of a float video [T, H, W, 3] and its masks [T, H, W].

  The mean over consecutive pairs of frames of the product of
    shape   IoU of the two masks with centroids aligned, divided by the best IoU their areas allow,
    area    exp(-|log area step - the clip's median log area step|) (smooth growth is fine),
    motion  exp(-|centroid step - the clip's median step| / object radius) (jumps are not),
    colour  1 - |median colour change| / 128, floored at 0,
  and 0 for a pair where either frame has no object.
  """
  areas = masks.sum(axis=(1, 2)).astype(np.float64)
  present = areas > 0
  pairs = len(masks) - 1
  both = present[:-1] & present[1:]
  if pairs < 1 or not both.any():
    return 0.0
  centroids = np.stack([_centroid(m) if p else np.zeros(2) for m, p in zip(masks, present)])
  colours = np.stack([np.median(v[m], axis=0) if p else np.zeros(3)
                      for v, m, p in zip(video, masks, present)])
  log_area_steps = np.diff(np.log(np.maximum(areas, 1.0)))
  steps = np.diff(centroids, axis=0)
  typical_area_step = np.median(log_area_steps[both])
  typical_step = np.median(steps[both], axis=0)
  total = 0.0
  for t in np.nonzero(both)[0]:
    a, b = masks[t], masks[t + 1]
    shift = centroids[t] - centroids[t + 1]  # (x, y)
    moved = ndimage.shift(b.astype(np.float64), (shift[1], shift[0]), order=1, mode='constant')
    iou = np.minimum(a, moved).sum() / np.maximum(a, moved).sum()
    shape_sim = min(1.0, iou * max(areas[t], areas[t + 1]) / min(areas[t], areas[t + 1]))
    area_sim = np.exp(-abs(log_area_steps[t] - typical_area_step))
    radius = np.sqrt(min(areas[t], areas[t + 1]) / np.pi)
    motion_sim = np.exp(-np.linalg.norm(steps[t] - typical_step) / radius)
    colour_sim = max(0.0, 1.0 - np.linalg.norm(colours[t + 1] - colours[t]) / 128.0)
    total += shape_sim * area_sim * motion_sim * colour_sim
  return float(total / pairs)


# ----------------------------------------------------------------------------------------------
# The judge.
# ----------------------------------------------------------------------------------------------
def judge_video(video: Any) -> Dict[str, Any]:
  """Reads colour, shape, motion and consistency from one video [T, H, W, 3].

  Returns:
    dict with 'colour', 'shape', 'motion' (names from data.moving_shapes, or None when no object
    is found; motion may also be 'static'), 'consistency' (float in [0, 1]), 'present' (fraction of
    frames with an object), 'rgb' (median object colour), 'features' (shape features), 'dx', 'dy'
    (centroid travel as fractions of the frame) and 'area_ratio' (last / first area).
  """
  video = _as_float_video(video)
  masks, distance = segment(video)
  present = masks.any(axis=(1, 2))
  result = {'colour': None, 'shape': None, 'motion': None, 'consistency': 0.0,
            'present': float(present.mean())}
  if not present.any():
    return result
  # The colour of the object's core: blur mixes its rim with the background.
  core = masks & (distance >= np.median(distance[masks]))
  rgb = np.median(video[core], axis=0)
  result.update(colour=nearest_colour(rgb), rgb=rgb, consistency=consistency(video, masks))
  features = _clip_shape_features(masks)
  if features is not None:
    result.update(shape=classify_shape(features), features=dict(zip(_FEATURE_NAMES, features)))
  centroids = np.zeros((len(masks), 2))
  for t in np.nonzero(present)[0]:
    centroids[t] = _centroid(masks[t])
  motion, trend = classify_motion(present, centroids, masks.sum(axis=(1, 2)).astype(np.float64),
                                  video.shape[1:3])
  result.update(motion=motion, **trend)
  return result


Prompt = Union[str, Tuple[str, str, str]]


def score(videos: Iterable[Any], prompts: Sequence[Prompt]) -> Dict[str, Any]:
  """Judges videos against their prompts.

  Args:
    videos: [N, T, H, W, 3] array or an iterable of N videos [T, H, W, 3].
    prompts: N captions ('a red circle moving left') or (colour, shape, motion) tuples.

  Returns:
    dict with 'colour_acc', 'shape_acc', 'motion_acc', 'all_acc' (all three right), 'consistency'
    (means over the videos), 'num_videos' and 'judgements' (the per-video dicts).
  """
  judgements = [judge_video(v) for v in videos]
  if len(judgements) != len(prompts):
    raise ValueError(f'Got {len(judgements)} videos but {len(prompts)} prompts.')
  targets = [moving_shapes.parse_caption(p) if isinstance(p, str) else tuple(p) for p in prompts]
  hits = np.array([[j['colour'] == c, j['shape'] == s, j['motion'] == m]
                   for j, (c, s, m) in zip(judgements, targets)], bool).reshape(-1, 3)
  return {
      'colour_acc': float(hits[:, 0].mean()),
      'shape_acc': float(hits[:, 1].mean()),
      'motion_acc': float(hits[:, 2].mean()),
      'all_acc': float(hits.all(axis=1).mean()),
      'consistency': float(np.mean([j['consistency'] for j in judgements])),
      'num_videos': len(judgements),
      'judgements': judgements,
  }


def chance_levels() -> Dict[str, float]:
  """Accuracies of uniform guessing over the dataset's attribute values."""
  c, s, m = (len(moving_shapes.COLOUR_NAMES), len(moving_shapes.SHAPES),
             len(moving_shapes.MOTIONS))
  return {'colour_acc': 1 / c, 'shape_acc': 1 / s, 'motion_acc': 1 / m, 'all_acc': 1 / (c * s * m)}


def format_scores(scores: Dict[str, Any], title: str = 'judge') -> str:
  """A small table of the scores, with chance levels beside the accuracies."""
  chance = chance_levels()
  lines = [f'{title} ({scores["num_videos"]} videos)', f'  {"metric":<12} {"score":>7} {"chance":>7}']
  for key in ('colour_acc', 'shape_acc', 'motion_acc', 'all_acc', 'consistency'):
    ref = f'{chance[key]:7.3f}' if key in chance else ' ' * 7
    lines.append(f'  {key:<12} {scores[key]:7.3f} {ref}')
  return '\n'.join(lines)


def print_scores(scores: Dict[str, Any], title: str = 'judge') -> None:
  print(format_scores(scores, title))
