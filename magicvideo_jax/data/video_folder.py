"""TFDS builder for a local folder of captioned video files (WebVid layout or a plain CSV).

The builder decodes every listed video once, keeps up to `num_frames` frames of it at the configured
resolution, and writes them as raw uint8 arrays (array_record, random access through
`tfds.data_source`; no TensorFlow needed to build or read). Frame sampling (stride, start, crop) is
left to `magicvideo_jax/data/input_pipeline.py`, which draws a new clip from the stored frames every epoch.

Features (the contract shared by every video dataset in `data/`):
  'video'    uint8 [T, H, W, 3]  T in [min_frames, num_frames]; H = W = resolution, except with
                                 resize_mode='shorter_side' (min(H, W) = resolution)
  'caption'  text
  'fps'      float32 scalar      frame rate of the stored frames (source fps / frame step)
  'filename' text                path of the source file, relative to video_dir

Captions CSV, one of two layouts (detected from the header):
  WebVid:  videoid,contentUrl,duration,page_dir,name  -> file `<videoid>.mp4` (also looked up as
           `<page_dir>/<videoid>.mp4`), caption = `name`.
  Plain:   path,caption                               -> `path` relative to video_dir.

Files that are missing, empty, unreadable (corrupt, truncated, not a video) or shorter than
`min_frames` are skipped; the build never stops on one bad file. Each is listed by name with its
reason in the log and in `build_report.json`, written next to the prepared dataset.

Usage:
  builder = VideoFolder(video_dir='/data/webvid/videos', csv_path='/data/webvid/results.csv',
                        num_frames=32, resolution=256, data_dir='/data/tfds')
  builder.download_and_prepare()          # offline
  source = builder.as_data_source('train')  # random access: source[i]['video']
  print(builder.build_report['skipped'])

A prepared dataset can be read without the video folder:
`tfds.builder_from_directory(builder.data_dir)` (or `input_pipeline.load_source`).
"""

import collections
import concurrent.futures
import csv
import dataclasses
import inspect
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from absl import logging
from etils import epath
import imageio.v3 as iio
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

RESIZE_MODES = ('center_crop', 'square', 'shorter_side')
REPORT_FILENAME = 'build_report.json'


# ------------------------------------------------------------------------------------------------
# Pixel helpers (shared with image_folder.py and the input pipeline).
# ------------------------------------------------------------------------------------------------
def resize_frames(frames: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Resizes uint8 frames `[..., H, W, 3]` to `size` = (height, width) with antialiased bicubic."""
  height, width = size
  if frames.shape[-3:-1] == (height, width):
    return frames
  flat = frames.reshape((-1,) + frames.shape[-3:])
  out = np.stack([
      np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
      for f in flat])
  return out.reshape(frames.shape[:-3] + (height, width, frames.shape[-1]))


def shorter_side_size(height: int, width: int, resolution: int) -> Tuple[int, int]:
  """(height, width) scaled so that the shorter side equals `resolution`."""
  scale = resolution / min(height, width)
  return (max(resolution, round(height * scale)), max(resolution, round(width * scale)))


def resize(frames: np.ndarray, resolution: int, mode: str) -> np.ndarray:
  """Builder-time resize of `[..., H, W, 3]` frames according to `mode` (see RESIZE_MODES)."""
  height, width = frames.shape[-3:-1]
  if mode == 'square':
    return resize_frames(frames, (resolution, resolution))
  frames = resize_frames(frames, shorter_side_size(height, width, resolution))
  if mode == 'shorter_side':
    return frames
  if mode == 'center_crop':
    height, width = frames.shape[-3:-1]
    top, left = (height - resolution) // 2, (width - resolution) // 2
    return frames[..., top:top + resolution, left:left + resolution, :]
  raise ValueError(f'resize_mode must be one of {RESIZE_MODES}, got {mode!r}.')


# ------------------------------------------------------------------------------------------------
# CSV reading and robust building, shared with image_folder.py.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
  """One CSV row: candidate file paths (first existing one wins) and its caption."""
  name: str  # How the file is named in the report: the path relative to the media folder.
  candidates: List[str]
  caption: str


class Skipped(Exception):
  """Raised by a loader for a file that must be left out of the dataset."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason
    self.detail = detail


def read_rows(csv_path: str, media_dir: str, *, allow_webvid: bool = True) -> List[Row]:
  """Parses a captions CSV in the WebVid (`videoid,...,name`) or plain (`path,caption`) layout."""
  with open(csv_path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    fields = set(reader.fieldnames or ())
    if {'path', 'caption'} <= fields:
      return [Row(name=r['path'], candidates=[os.path.join(media_dir, r['path'])],
                  caption=(r['caption'] or '').strip()) for r in reader]
    if allow_webvid and {'videoid', 'name'} <= fields:
      rows = []
      for r in reader:
        filename = f"{r['videoid']}.mp4"
        candidates = [os.path.join(media_dir, filename)]
        if r.get('page_dir'):
          candidates.append(os.path.join(media_dir, r['page_dir'], filename))
        rows.append(Row(name=filename, candidates=candidates, caption=(r['name'] or '').strip()))
      return rows
  expected = "'path,caption'" + (" or WebVid's 'videoid,...,name'" if allow_webvid else '')
  raise ValueError(f'{csv_path}: header {sorted(fields)} has neither {expected} columns.')


def existing_file(row: Row) -> str:
  """The first candidate path of `row` that is a non-empty file; raises Skipped otherwise."""
  for path in row.candidates:
    if os.path.isfile(path):
      if os.path.getsize(path) == 0:
        raise Skipped('empty', 'zero-length file')
      return path
  raise Skipped('missing', 'no such file')


def ordered_parallel_map(fn: Callable[[Any], Any], items: Iterable[Any],
                         num_workers: int) -> Iterator[Any]:
  """`map(fn, items)` on a thread pool, in order, with a bounded number of items in flight."""
  if num_workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * num_workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class BuildReport:
  """Collects kept and skipped files during a build; written as `build_report.json`."""

  def __init__(self):
    self.num_rows = 0
    self.num_files_ok = 0
    self.num_examples = 0
    self.skipped: List[Dict[str, str]] = []

  def skip(self, name: str, err: Skipped):
    logging.warning('Skipping %s (%s).', name, err)
    self.skipped.append(dict(file=name, reason=err.reason, detail=err.detail))

  def to_dict(self) -> Dict[str, Any]:
    return dict(
        num_rows=self.num_rows, num_files_ok=self.num_files_ok, num_examples=self.num_examples,
        num_skipped=len(self.skipped),
        skipped_by_reason=dict(collections.Counter(s['reason'] for s in self.skipped)),
        skipped=self.skipped)

  def write(self, directory: str):
    d = self.to_dict()
    with open(os.path.join(directory, REPORT_FILENAME), 'w') as f:
      json.dump(d, f, indent=1)
    logging.info('Build report: %d rows, %d files kept (%d examples), %d skipped %s; see %s.',
                 d['num_rows'], d['num_files_ok'], d['num_examples'], d['num_skipped'],
                 d['skipped_by_reason'], os.path.join(directory, REPORT_FILENAME))
    for s in self.skipped:
      logging.info('  skipped %s: %s %s', s['file'], s['reason'], s['detail'])


class NoUsableFilesError(ValueError):
  """Every file of a folder build was skipped: the build report, in one line."""


class RobustFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Offline array_record builder that writes a `build_report.json` next to the dataset."""

  _report: Optional[BuildReport] = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup needs `importlib_resources` (not installed) for builders inside a package.
    return epath.Path(inspect.getfile(cls))

  def download_and_prepare(self, *, download_dir=None, download_config=None, file_format=None):
    """Builds the dataset offline (unless told otherwise) and writes the build report."""
    if download_config is None:
      download_config = tfds.download.DownloadConfig(try_download_gcs=False)
    self._report = None
    super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                 file_format=file_format)
    if self._report is not None:  # None when the dataset was already prepared.
      self._report.write(self.data_dir)

  @property
  def build_report(self) -> Optional[Dict[str, Any]]:
    """The report of the build that produced this dataset (None if there is none)."""
    path = os.path.join(self.data_dir, REPORT_FILENAME)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def _generate_rows(self, rows: List[Row], load: Callable[[str], List[Dict[str, Any]]],
                     num_workers: int) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Yields (key, example) for every loadable row; records the rest in the report."""
    report = self._report = BuildReport()
    report.num_rows = len(rows)

    def try_load(row):  # Runs on a worker thread.
      try:
        return row, load(existing_file(row)), None
      except Skipped as e:
        return row, None, e
      except Exception as e:  # pylint: disable=broad-except  # Never die on one bad file.
        return row, None, Skipped('unreadable', f'{type(e).__name__}: {e}'[:300])

    results = ordered_parallel_map(try_load, rows, num_workers)
    for row_index, (row, examples, err) in enumerate(results):
      if err is not None:
        report.skip(row.name, err)
        continue
      report.num_files_ok += 1
      for i, example in enumerate(examples):
        report.num_examples += 1
        # The row index keeps keys unique when a CSV lists a file twice.
        key = f'{row_index}:{row.name}#{i}'
        yield key, dict(example, caption=row.caption, filename=row.name)
    if not report.num_examples:  # Else TFDS's bare `AssertionError: No examples were yielded`.
      d = report.to_dict()
      first = d['skipped'][0] if d['skipped'] else None
      example = f'; first: {first["file"]}: {first["reason"]} {first["detail"]}'[:300] if first else ''
      raise NoUsableFilesError(
          f'no usable file among the {d["num_rows"]} rows: skipped by reason '
          f'{d["skipped_by_reason"] or "(no rows)"}{example}; nothing was written')


# ------------------------------------------------------------------------------------------------
# VideoFolder.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
  """What the builder stores. `name` tells datasets apart under one data_dir (see `make_config`).

  Attributes:
    video_dir: folder holding the video files.
    csv_path: captions CSV (default `<video_dir>/captions.csv`).
    num_frames: most frames stored per example (per clip).
    min_frames: videos with fewer (stored) frames are skipped.
    resolution: output size: the side of the square, or the shorter side ('shorter_side').
    resize_mode: 'center_crop' (shorter side to resolution, centre square), 'square' (squash to a
      square) or 'shorter_side' (keep the aspect ratio).
    max_fps: if set, keep every k-th frame so that the stored fps = source fps / k <= max_fps.
    clips_per_video: store up to this many consecutive, non-overlapping clips of `num_frames`
      frames from each video (each >= min_frames), each as its own example.
    default_fps: fps assumed when the container does not report one (None: skip such files).
  """
  video_dir: str = ''
  csv_path: str = ''
  num_frames: int = 32
  min_frames: int = 16
  resolution: int = 256
  resize_mode: str = 'center_crop'
  max_fps: Optional[float] = None
  clips_per_video: int = 1
  default_fps: Optional[float] = None


def make_config(video_dir: str, csv_path: Optional[str] = None, *, name: Optional[str] = None,
                **kwargs) -> VideoFolderConfig:
  """A VideoFolderConfig named `<folder>_<res>px_<frames>f` unless `name` is given."""
  config = VideoFolderConfig(name='_', video_dir=video_dir,
                             csv_path=csv_path or os.path.join(video_dir, 'captions.csv'), **kwargs)
  if name is None:
    folder = os.path.basename(os.path.normpath(video_dir)) or 'videos'
    name = f'{folder}_{config.resolution}px_{config.num_frames}f'
    if config.resize_mode != 'center_crop':
      name += f'_{config.resize_mode}'
  if config.resize_mode not in RESIZE_MODES:
    raise ValueError(f'resize_mode must be one of {RESIZE_MODES}, got {config.resize_mode!r}.')
  if not 1 <= config.min_frames <= config.num_frames:
    raise ValueError(f'Need 1 <= min_frames ({config.min_frames}) <= num_frames '
                     f'({config.num_frames}).')
  return dataclasses.replace(config, name=name)


def read_video(path: str, config: VideoFolderConfig, plugin: str = 'pyav'
               ) -> List[Dict[str, Any]]:
  """Decodes the frames `config` asks for from one file: a list of {'video', 'fps'} clips."""
  with iio.imopen(path, 'r', plugin=plugin) as f:
    fps = f.metadata().get('fps') or config.default_fps
    if not fps or not math.isfinite(fps) or fps <= 0:
      raise Skipped('unreadable', 'no frame rate in the container (set default_fps)')
    step = 1
    if config.max_fps and fps > config.max_fps:
      step = math.ceil(fps / config.max_fps - 1e-6)
    wanted = config.num_frames * config.clips_per_video
    frames = []
    for i, frame in enumerate(f.iter()):
      if i % step == 0:
        frames.append(frame)
        if len(frames) == wanted:  # Do not decode the rest of a long video.
          break
  if not frames:
    raise Skipped('unreadable', 'no frames decoded')
  if len(frames) < config.min_frames:
    raise Skipped('too_short', f'{len(frames)} frames < min_frames={config.min_frames}')
  clips = []
  for start in range(0, len(frames), config.num_frames):
    clip = frames[start:start + config.num_frames]
    if len(clip) >= config.min_frames:
      video = resize(np.stack(clip)[..., :3], config.resolution, config.resize_mode)
      clips.append(dict(video=np.ascontiguousarray(video, np.uint8), fps=np.float32(fps / step)))
  return clips


class VideoFolder(RobustFolderBuilder):
  """Captioned videos from a local folder. See the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, config: Optional[VideoFolderConfig] = None, video_dir: Optional[str] = None,
               csv_path: Optional[str] = None, num_workers: int = 4, plugin: str = 'pyav',
               data_dir: Optional[str] = None, **config_kwargs):
    """Either a `config` or `video_dir` (+ VideoFolderConfig fields as keyword arguments).

    Args:
      config: a VideoFolderConfig (from `make_config`).
      video_dir: folder of videos, used with `csv_path` and `config_kwargs` to make a config.
      csv_path: captions CSV (default `<video_dir>/captions.csv`).
      num_workers: decoding threads during the build.
      plugin: imageio v3 plugin that decodes the files ('pyav' or 'FFMPEG' for imageio-ffmpeg).
      data_dir: TFDS data dir; the dataset lands in `<data_dir>/video_folder/<config.name>/1.0.0`.
      **config_kwargs: fields of VideoFolderConfig (num_frames, resolution, name, ...).
    """
    if config is None:
      if video_dir is None:
        raise ValueError('VideoFolder needs `config=make_config(...)` or `video_dir=...`.')
      config = make_config(video_dir, csv_path, **config_kwargs)
    elif video_dir is not None or config_kwargs:
      raise ValueError('Pass either `config` or `video_dir` and its options, not both.')
    self._num_workers = num_workers
    self._plugin = plugin
    super().__init__(config=config, data_dir=data_dir, file_format='array_record')

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    side = c.resolution if c.resize_mode != 'shorter_side' else None
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Captioned videos from {c.video_dir} ({c.csv_path}), up to {c.num_frames} '
                    f'frames at {c.resolution}px ({c.resize_mode}).',
        features=tfds.features.FeaturesDict({
            # Raw bytes: tf.Example would store uint8 pixels as int64 varints.
            'video': tfds.features.Tensor(shape=(None, side, side, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'caption': tfds.features.Text(),
            'fps': tfds.features.Scalar(dtype=np.float32),
            'filename': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    c = self.builder_config
    if not os.path.isfile(c.csv_path):
      raise FileNotFoundError(f'Captions CSV not found: {c.csv_path} (set csv_path).')
    return {'train': self._generate_examples(read_rows(c.csv_path, c.video_dir))}

  def _generate_examples(self, rows: List[Row]):
    load = lambda path: read_video(path, self.builder_config, self._plugin)
    return self._generate_rows(rows, load, self._num_workers)
