"""Video files: mp4 through imageio's ffmpeg plugin (imageio-ffmpeg ships its own binary), GIF through
Pillow. No system ffmpeg is needed.

A written file is verified before it takes its name: it is encoded to a temporary file beside the
target, read back (readable, the right frame count and size), then renamed; on any failure the partial
file is removed and `VideoWriteError` names the path and the cause. Paths with a URL scheme (gs://...)
are encoded locally and copied through `etils.epath`.
"""

import os
import tempfile
from typing import Sequence
import warnings

from etils import epath
import imageio.v3 as iio
import numpy as np

VIDEO_EXTENSIONS = ('.mp4', '.gif', '.webm', '.mov', '.mkv')


class VideoWriteError(OSError):
  """A video file could not be written or did not read back: one line with the path and the cause."""


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Float frames in [0, 1] (or uint8) -> uint8."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    return frames
  return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)


def _encode(path: str, frames: np.ndarray, fps: float, quality: float, ext: str) -> None:
  if ext == '.gif':
    iio.imwrite(path, frames, extension='.gif', duration=1000.0 / fps, loop=0)
    return
  h, w = frames.shape[1:3]
  if h % 2 or w % 2:  # yuv420p needs even sizes.
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode='edge')
  with warnings.catch_warnings():  # imageio-ffmpeg forks and at once execs ffmpeg: harmless.
    warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called', category=RuntimeWarning)
    iio.imwrite(path, frames, extension=ext, fps=fps,
                codec='libx264' if ext != '.webm' else 'libvpx-vp9', macro_block_size=1,
                quality=quality)


def _verify(path: str, frames: np.ndarray, ext: str) -> None:
  """Raises ValueError unless the file reads back with the frames' count and size."""
  try:
    with warnings.catch_warnings():  # imageio-ffmpeg forks and at once execs ffmpeg: harmless.
      warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called', category=RuntimeWarning)
      back = read_video(path)
  except Exception as e:  # pylint: disable=broad-except  # Any decoder error means a bad file.
    raise ValueError(f'the written file does not read back ({type(e).__name__}: {e})') from None
  count, size = frames.shape[0], frames.shape[1:3]
  # Pillow merges identical consecutive GIF frames (their durations add up): fewer is fine there.
  count_ok = back.shape[0] == count if ext != '.gif' else 1 <= back.shape[0] <= count
  if not count_ok or back.shape[1] < size[0] or back.shape[2] < size[1]:
    raise ValueError(f'the written file reads back as {back.shape[0]} frames of '
                     f'{back.shape[1]}x{back.shape[2]}, expected {count} of {size[0]}x{size[1]}')


def write_video(path: str, frames: np.ndarray, fps: float = 8.0, quality: float = 8) -> str:
  """Writes `[F, H, W, 3]` frames to `path` (by extension: .mp4, .gif, .webm, .mov, .mkv), verified.

  `quality` (0-10, not GIF): imageio-ffmpeg's quality; lower compresses harder.

  Returns:
    the path.

  Raises:
    ValueError: bad frames, fps or extension (before anything is written).
    VideoWriteError: the file could not be written or did not read back; nothing is left behind.
  """
  frames = to_uint8(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or not frames.shape[0]:
    raise ValueError(f'expected frames [F, H, W, 3] with F >= 1, got {frames.shape}')
  if not np.isfinite(fps) or fps <= 0:
    raise ValueError(f'fps={fps} must be a finite number > 0')
  ext = os.path.splitext(str(path))[1].lower()
  if ext not in VIDEO_EXTENSIONS:
    raise ValueError(f'unsupported video extension {ext!r}: use one of {", ".join(VIDEO_EXTENSIONS)}')
  target = epath.Path(path)
  local = '://' not in str(path)
  tmp = None
  try:
    if local:
      if target.is_dir():
        raise ValueError('it is a directory')
      target.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=f'.{target.name}.', suffix=ext, dir=str(target.parent))
    else:
      fd, tmp = tempfile.mkstemp(suffix=ext)
    os.close(fd)
    _encode(tmp, frames, float(fps), quality, ext)
    _verify(tmp, frames, ext)
    if local:
      os.replace(tmp, str(target))
    else:
      epath.Path(tmp).copy(target, overwrite=True)
      os.remove(tmp)
    tmp = None
  except (OSError, ValueError, RuntimeError) as e:
    cause = ' '.join(str(e).split()) or type(e).__name__  # One line, whatever ffmpeg printed.
    cause = cause if len(cause) <= 300 else cause[:297] + '...'
    raise VideoWriteError(f'{path}: not written: {cause}') from None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  return str(path)


def read_video(path: str) -> np.ndarray:
  """`[F, H, W, 3]` uint8 frames of a video file."""
  frames = np.asarray(iio.imread(path, index=None))
  return (frames[None] if frames.ndim == 3 else frames)[..., :3]


def read_image(path: str) -> np.ndarray:
  """An image file -> uint8 `[H, W, 3]` (grey and RGBA become RGB)."""
  image = np.asarray(iio.imread(path))
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'not an RGB image: shape {image.shape}')
  return to_uint8(image[..., :3]) if image.dtype != np.uint8 else image[..., :3]


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
