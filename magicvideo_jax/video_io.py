"""Video files: mp4 through imageio's ffmpeg plugin (imageio-ffmpeg ships its own binary), GIF through
Pillow. No system ffmpeg is needed."""

import os
from typing import Sequence
import warnings

import imageio.v3 as iio
import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Float frames in [0, 1] (or uint8) -> uint8."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    return frames
  return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, fps: float = 8.0, quality: float = 8) -> str:
  """Writes `[F, H, W, 3]` frames to `path` (.mp4, .gif or .webm, by extension). Returns the path.

  `quality` (0-10, mp4/webm only): imageio-ffmpeg's quality; lower compresses harder.
  """
  frames = to_uint8(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'expected frames [F, H, W, 3], got {frames.shape}')
  os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
  ext = os.path.splitext(path)[1].lower()
  if ext == '.gif':
    iio.imwrite(path, frames, duration=1000.0 / fps, loop=0)
  elif ext in ('.mp4', '.webm', '.mov', '.mkv'):
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes.
      frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode='edge')
    with warnings.catch_warnings():  # imageio-ffmpeg forks and at once execs ffmpeg: harmless.
      warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called', category=RuntimeWarning)
      iio.imwrite(path, frames, fps=fps, codec='libx264' if ext != '.webm' else 'libvpx-vp9',
                  macro_block_size=1, quality=quality)
  else:
    raise ValueError(f'unsupported video extension {ext!r}: use .mp4 or .gif')
  return path


def read_video(path: str) -> np.ndarray:
  """`[F, H, W, 3]` uint8 frames of a video file."""
  frames = np.asarray(iio.imread(path, index=None))
  return (frames[None] if frames.ndim == 3 else frames)[..., :3]


def tile_videos(videos: np.ndarray, columns: int = 0) -> np.ndarray:
  """`[B, F, H, W, 3]` -> one `[F, rows*H, columns*W, 3]` grid video."""
  videos = np.asarray(videos)
  b = videos.shape[0]
  columns = columns or b
  rows = -(-b // columns)
  pad = rows * columns - b
  if pad:
    videos = np.concatenate([videos, np.zeros((pad,) + videos.shape[1:], videos.dtype)], 0)
  f, h, w, c = videos.shape[1:]
  grid = videos.reshape(rows, columns, f, h, w, c).transpose(2, 0, 3, 1, 4, 5)
  return grid.reshape(f, rows * h, columns * w, c)


def upscale_nearest(frames: np.ndarray, factor: int) -> np.ndarray:
  """Enlarges small frames for viewing: `[..., H, W, C]` -> `[..., H*factor, W*factor, C]`."""
  if factor <= 1:
    return frames
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def write_videos(paths: Sequence[str], videos: np.ndarray, fps: float = 8.0) -> None:
  for path, video in zip(paths, videos):
    write_video(path, video, fps)
