"""Input pipeline: random-access TFDS data sources -> per-host numpy batches -> global jax.Arrays.

Pure numpy/python on top of `tfds.data_source` (array_record); no tf.data. Every random choice
(shuffle order, clip stride and start, crop, caption dropout, appended images) is a function of
(seed, epoch, global example index) alone, so the stream is deterministic, independent of thread
timing and of the number of processes, and resumable from `get_state()`.

Global batch k of epoch e holds the examples `perm_e[k * G:(k + 1) * G]` (G = global_batch_size,
perm_e a seeded permutation of the split; the last N mod G examples of an epoch are dropped).
Process p of P reads the contiguous slice `[p * G / P, (p + 1) * G / P)` of it, so the per-process
batches concatenated in process order are the single-process global batch, element for element;
`to_global` assembles them with `jax.make_array_from_process_local_data`.

Batch (per process, B = G / P, F = num_frames, n = num_image_frames, R = resolution):
  'video'       float32 [B, F + n, R, R, 3] in [-1, 1]; video frames first, then the n images
  'frame_mask'  bool    [B, F + n]  True for video frames, False for appended images
  'fps'         float32 [B]         frame rate of the sampled clip: stored fps / frame stride
  'caption'     object  [B]         str; "" where dropped (classifier-free guidance)
  'input_ids'   int32   [B, L]      tokenize_fn(captions), if tokenize_fn is given
  'index'       int32   [B]         example index in the split (for debugging)
  with n > 0 also 'image_caption' object [B, n] and, with tokenize_fn, 'image_input_ids' int32
  [B, n, L] (each image's own caption, dropped at the same rate).
From a dataset of precomputed latents (`magicvideo_jax/tools/encode_latents.py`: examples hold 'latent_mean' and
'latent_std' instead of 'video'), 'video' is replaced by
  'latent_mean', 'latent_std'  float32 [B, F, h, w, c]  the VAE posterior of the sampled frames
(frames are sampled the same way; no resize or crop: the latents were encoded at their resolution).

Clip sampling: a stride s uniform in frame_stride_range (limited to what the stored clip allows)
and a uniform start; F frames `start + s * arange(F)`. Clips shorter than F frames repeat their
last frame (build the dataset with min_frames >= num_frames to avoid it). Frames are resized so
that the shorter side is R, then cropped to R x R, at the centre or (random_crop) at a uniform
offset; random crops only matter for data stored larger or non-square (resize_mode='shorter_side').

`config.data` keys (read by `create_iterator`):
  dataset             a directory holding dataset_info.json, or 'name[/config][:version]' under
                      data_dir (e.g. 'video_folder/webvid_256px_32f', 'moving_shapes/tiny')
  data_dir            TFDS data dir (None: ~/tensorflow_datasets)
  split               'train' (TFDS slicing such as 'train[:95%]' works)
  precomputed_latents the dataset holds VAE latents (magicvideo_jax/tools/encode_latents.py), not pixels
  prepare             build a registered dataset (e.g. moving_shapes) if it is not prepared yet;
                      VideoFolder / ImageFolder need their folders: build them beforehand
  global_batch_size   clips per step over all processes (divisible by the process count)
  num_frames          F, frames per clip
  frame_stride_range  (min, max) stride between sampled frames, inclusive
  resolution          R, output height and width
  random_crop         bool, random instead of centre crop
  caption_dropout     probability that a caption becomes "" (0.1 for classifier-free guidance)
  caption_fraction    fraction of the split's clips that keep their captions (1.0: all); the others
                      read as uncaptioned (""). Which ones is a seeded choice (`captioned_indices`):
                      the same for every run with the same caption_seed, split and dataset
  caption_seed        seed of that choice (independent of `seed`, so runs with other pipeline seeds
                      see the same captioned clips)
  captioned_only      read only the captioned clips (the split shrinks to them)
  num_image_frames    n images appended to every clip (joint image-video training; 0: off)
  image_dataset       dataset of images (same forms as `dataset`), needed when n > 0
  image_split         split of image_dataset ('train')
  seed                int >= 0, the pipeline seed
  shuffle             bool, shuffle every epoch
  num_epochs          None (repeat forever) or the number of epochs
  num_threads         threads decoding the examples of a batch
  prefetch            batches prepared ahead on a background thread (0: synchronous)
See `default_config()`.

Checkpointing: `iterator.get_state()` is a small JSON-able dict; save it with the train state as
`ocp.args.JsonSave(iterator.get_state())` and restore with `iterator.set_state(restored)`; the next
batch is then exactly the one that followed the save.
"""

import concurrent.futures
import importlib
import os
import queue
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from magicvideo_jax.data import video_folder

Batch = Dict[str, Any]
TokenizeFn = Callable[[List[str]], np.ndarray]

# First word of every per-purpose random stream, so that streams never coincide.
_PERMUTATION_STREAM = 0
_EXAMPLE_STREAM = 1
_CAPTION_STREAM = 2
_STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Data sources.
# ------------------------------------------------------------------------------------------------
def _latest_version_dir(path: str) -> Optional[str]:
  """`path` if it is a prepared dataset, else its newest prepared version subdirectory."""
  if os.path.isfile(os.path.join(path, 'dataset_info.json')):
    return path
  if not os.path.isdir(path):
    return None
  versions = []
  for v in os.listdir(path):
    if os.path.isfile(os.path.join(path, v, 'dataset_info.json')):
      try:
        versions.append((tfds.core.Version(v), v))
      except ValueError:
        continue
  return os.path.join(path, max(versions)[1]) if versions else None


def prepared_directory(dataset: str, data_dir: Optional[str] = None) -> Optional[str]:
  """The directory of a prepared dataset ('dir' or 'name[/config][:version]'), else None."""
  name, _, version = dataset.partition(':')
  directory = _latest_version_dir(dataset)
  if directory is None:
    root = data_dir or os.environ.get('TFDS_DATA_DIR') or tfds.core.constants.DATA_DIR
    directory = _latest_version_dir(os.path.join(os.path.expanduser(root), *name.split('/'),
                                                 version))
  return directory


def load_source(dataset: str, *, data_dir: Optional[str] = None, split: str = 'train',
                prepare: bool = False):
  """A random-access data source for a prepared dataset.

  Args:
    dataset: a directory holding dataset_info.json, or 'name[/config][:version]' under data_dir.
      Prepared datasets are read from their files (no builder class needed); otherwise the builder
      is looked up by name (module `magicvideo_jax/data/<name>.py` or tfds).
    data_dir: TFDS data dir.
    split: split, TFDS slicing allowed.
    prepare: build a registered dataset that is not prepared yet (offline), e.g. moving_shapes.
      Every process that gets here builds its own copy: on several hosts sharing one data_dir,
      prepare the dataset beforehand.

  Returns:
    An object with `len()` and `[i]` returning a dict of numpy values.
  """
  name = dataset.partition(':')[0]
  directory = prepared_directory(dataset, data_dir)
  if directory is not None:
    return tfds.builder_from_directory(directory).as_data_source(split=split)
  try:  # A registered builder; importing magicvideo_jax/data/<name>.py registers it.
    importlib.import_module(f'magicvideo_jax.data.{name.split("/")[0]}')
  except ImportError:
    pass
  hint = (f'Dataset {dataset!r} is not prepared under data_dir={data_dir!r}: build it first '
          '(e.g. `builder.download_and_prepare()`), or point config.data.dataset at its directory.')
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # Unknown name: same advice.
    raise FileNotFoundError(f'{hint} ({type(e).__name__}: {e})'[:2000]) from e
  if not builder.is_prepared():
    if not prepare:
      raise FileNotFoundError(hint)
    logging.info('Preparing %s in %s.', dataset, data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder.as_data_source(split=split)


def _as_source(source_or_builder, split: str):
  if hasattr(source_or_builder, 'as_data_source'):
    return source_or_builder.as_data_source(split=split)
  return source_or_builder


def captioned_indices(num_examples: int, fraction: float, seed: int = 0) -> np.ndarray:
  """The sorted indices of the clips that keep their captions: `round(fraction * num_examples)`
  of them, the first entries of a permutation seeded by `seed` alone (deterministic)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'caption_fraction={fraction} must be in [0, 1].')
  count = int(round(fraction * num_examples))
  perm = np.random.default_rng([_CAPTION_STREAM, int(seed)]).permutation(num_examples)
  return np.sort(perm[:count])


class CaptionSubset:
  """A data source whose clips outside `captioned_indices` read as uncaptioned (caption ""), or,
  with `captioned_only`, the sub-source of the captioned clips alone (in index order)."""

  def __init__(self, source, fraction: float, seed: int = 0, captioned_only: bool = False):
    self._source = source
    self.captioned = captioned_indices(len(source), fraction, seed)
    if captioned_only and not len(self.captioned):
      raise ValueError(f'caption_fraction={fraction} leaves no captioned clip of {len(source)}.')
    self._is_captioned = np.zeros(len(source), bool)
    self._is_captioned[self.captioned] = True
    self._captioned_only = bool(captioned_only)

  def __len__(self) -> int:
    return len(self.captioned) if self._captioned_only else len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    if self._captioned_only:
      return self._source[int(self.captioned[index])]
    example = self._source[int(index)]
    if not self._is_captioned[int(index)]:
      example = dict(example, caption=b'')
    return example


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------------------------
# Per-example transforms.
# ------------------------------------------------------------------------------------------------
def sample_clip(video: np.ndarray, fps: float, rng: np.random.Generator, num_frames: int,
                stride_range: Tuple[int, int]) -> Tuple[np.ndarray, float]:
  """Picks `num_frames` frames of `video` [T, H, W, 3] at a random stride and start.

  Returns:
    frames [num_frames, H, W, 3] and their frame rate `fps / stride`.
  """
  length = video.shape[0]
  lo, hi = stride_range
  if num_frames > 1:  # Longest stride that still fits the clip, but at least 1.
    hi = min(hi, max(1, (length - 1) // (num_frames - 1)))
  lo = min(lo, hi)
  stride = int(rng.integers(lo, hi + 1))
  span = (num_frames - 1) * stride + 1
  start = int(rng.integers(0, max(length - span, 0) + 1))
  # Past the end (clip shorter than num_frames): repeat the last frame.
  idx = np.minimum(start + stride * np.arange(num_frames), length - 1)
  return video[idx], fps / stride


def crop_frames(frames: np.ndarray, resolution: int,
                rng: Optional[np.random.Generator]) -> np.ndarray:
  """Resizes `[..., H, W, 3]` (shorter side -> resolution) and crops a square (random if rng)."""
  height, width = frames.shape[-3:-1]
  if min(height, width) != resolution:
    frames = video_folder.resize_frames(
        frames, video_folder.shorter_side_size(height, width, resolution))
    height, width = frames.shape[-3:-1]
  if rng is not None:
    top = int(rng.integers(0, height - resolution + 1))
    left = int(rng.integers(0, width - resolution + 1))
  else:
    top, left = (height - resolution) // 2, (width - resolution) // 2
  return frames[..., top:top + resolution, left:left + resolution, :]


def to_float(pixels: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return pixels.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


# ------------------------------------------------------------------------------------------------
# The iterator.
# ------------------------------------------------------------------------------------------------
class VideoIterator:
  """Deterministic, resumable iterator of per-process video batches. See the module docstring."""

  def __init__(self, source, *, global_batch_size: int, num_frames: int,
               frame_stride_range: Tuple[int, int] = (1, 1), resolution: int,
               random_crop: bool = False, caption_dropout: float = 0.0,
               tokenize_fn: Optional[TokenizeFn] = None, num_image_frames: int = 0,
               image_source=None, seed: int = 0, process_index: Optional[int] = None,
               process_count: Optional[int] = None, shuffle: bool = True,
               num_epochs: Optional[int] = None, num_threads: int = 1, prefetch: int = 0,
               split: str = 'train', image_split: str = 'train'):
    self._source = _as_source(source, split)
    self._image_source = None if image_source is None else _as_source(image_source, image_split)
    self.num_examples = len(self._source)
    self.global_batch_size = int(global_batch_size)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if self.global_batch_size % self.process_count:
      raise ValueError(f'global_batch_size={global_batch_size} is not divisible by the '
                       f'{self.process_count} processes.')
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={process_index} not in [0, {self.process_count}).')
    self.local_batch_size = self.global_batch_size // self.process_count
    self.steps_per_epoch = self.num_examples // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'The split has {self.num_examples} examples, fewer than one global batch '
                       f'of {global_batch_size}.')
    lo, hi = (int(s) for s in frame_stride_range)
    if not 1 <= lo <= hi:
      raise ValueError(f'frame_stride_range must be (min, max) with 1 <= min <= max, got '
                       f'{frame_stride_range}.')
    if num_image_frames and self._image_source is None:
      raise ValueError(f'num_image_frames={num_image_frames} needs an image_source '
                       '(config.data.image_dataset).')
    if int(seed) < 0:
      raise ValueError(f'seed must be >= 0, got {seed}.')
    self.num_frames = int(num_frames)
    self.frame_stride_range = (lo, hi)
    self.resolution = int(resolution)
    self.random_crop = bool(random_crop)
    self.caption_dropout = float(caption_dropout)
    self.tokenize_fn = tokenize_fn
    self.num_image_frames = int(num_image_frames)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.num_epochs = num_epochs
    self._num_threads = int(num_threads)
    self._prefetch = int(prefetch)
    self._pool = None
    self._perm_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)
    self._warned_short = False
    # Position of the next batch handed to the caller.
    self._epoch, self._step = 0, 0
    self._thread: Optional[threading.Thread] = None
    self._queue: Optional[queue.Queue] = None
    self._stop: Optional[threading.Event] = None

  # -- Position and state. --
  def get_state(self) -> Dict[str, Any]:
    """JSON-able position: restoring it with `set_state` makes the next batch the one after."""
    return dict(version=_STATE_VERSION, seed=self.seed, epoch=self._epoch, step=self._step,
                global_batch_size=self.global_batch_size, num_examples=self.num_examples,
                shuffle=self.shuffle)

  def set_state(self, state: Dict[str, Any]):
    """Continues from a `get_state()` dict (possibly saved with another process count)."""
    for key in ('seed', 'global_batch_size', 'num_examples', 'shuffle'):
      if key in state and state[key] != getattr(self, key):
        raise ValueError(f'Iterator state has {key}={state[key]!r} but this iterator has '
                         f'{getattr(self, key)!r}: the saved position means nothing here.')
    self._stop_prefetch()
    self._epoch, self._step = int(state['epoch']), int(state['step'])

  def _advance(self, epoch: int, step: int) -> Tuple[int, int]:
    step += 1
    return (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

  def _finished(self, epoch: int) -> bool:
    return self.num_epochs is not None and epoch >= self.num_epochs

  # -- Indices. --
  def _permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._perm_cache
    if cached_epoch != epoch:
      if self.shuffle:
        rng = np.random.default_rng([_PERMUTATION_STREAM, self.seed, epoch])
        perm = rng.permutation(self.num_examples)
      else:
        perm = np.arange(self.num_examples)
      self._perm_cache = (epoch, perm)
    return perm

  def global_indices(self, epoch: int, step: int) -> np.ndarray:
    """Example indices of global batch `step` of `epoch`, [global_batch_size]."""
    start = step * self.global_batch_size
    return self._permutation(epoch)[start:start + self.global_batch_size]

  def local_indices(self, epoch: int, step: int) -> np.ndarray:
    """This process's contiguous slice of the global batch, [local_batch_size]."""
    start = self.process_index * self.local_batch_size
    return self.global_indices(epoch, step)[start:start + self.local_batch_size]

  # -- Examples and batches. --
  def _dropout(self, caption: str, rng: np.random.Generator) -> str:
    return '' if rng.random() < self.caption_dropout else caption

  def _load_example(self, epoch: int, index: int) -> Dict[str, Any]:
    rng = np.random.default_rng([_EXAMPLE_STREAM, self.seed, epoch, int(index)])
    ex = self._source[int(index)]
    if 'latent_mean' in ex:
      return self._load_latents(ex, rng, index)
    video = np.asarray(ex['video'])
    if video.shape[0] < self.num_frames and not self._warned_short:
      self._warned_short = True
      logging.warning('Example %d has %d frames < num_frames=%d: its last frame is repeated. '
                      'Build the dataset with min_frames >= num_frames.', index, video.shape[0],
                      self.num_frames)
    frames, fps = sample_clip(video, float(ex['fps']), rng, self.num_frames,
                              self.frame_stride_range)
    frames = crop_frames(frames, self.resolution, rng if self.random_crop else None)
    out = dict(caption=self._dropout(_text(ex['caption']), rng), fps=fps, index=int(index))
    if self.num_image_frames:
      img_idx = rng.integers(0, len(self._image_source), self.num_image_frames)
      images, captions = [], []
      for i in img_idx:
        image_ex = self._image_source[int(i)]
        images.append(crop_frames(np.asarray(image_ex['image']), self.resolution,
                                  rng if self.random_crop else None))
        captions.append(self._dropout(_text(image_ex['caption']), rng))
      frames = np.concatenate([frames, np.stack(images)], axis=0)
      out['image_caption'] = captions
    out['video'] = to_float(frames)
    return out

  def _load_latents(self, ex: Dict[str, Any], rng: np.random.Generator, index: int
                    ) -> Dict[str, Any]:
    if self.num_image_frames:
      raise ValueError('num_image_frames > 0 is not supported with precomputed latents: the '
                       'appended images would need latents of their own.')
    mean, std = np.asarray(ex['latent_mean']), np.asarray(ex['latent_std'])
    # Mean and std side by side so that one draw of the stride and start picks both.
    both, fps = sample_clip(np.concatenate([mean, std], axis=-1), float(ex['fps']), rng,
                            self.num_frames, self.frame_stride_range)
    channels = mean.shape[-1]
    return dict(caption=self._dropout(_text(ex['caption']), rng), fps=fps, index=int(index),
                latent_mean=both[..., :channels].astype(np.float32),
                latent_std=both[..., channels:].astype(np.float32))

  def make_batch(self, epoch: int, step: int) -> Batch:
    """This process's batch number `step` of `epoch` (a pure function of its arguments)."""
    indices = self.local_indices(epoch, step)
    load = lambda i: self._load_example(epoch, i)
    if self._num_threads > 1:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads)
      examples = list(self._pool.map(load, indices))
    else:
      examples = [load(i) for i in indices]
    num_video = self.num_frames
    frame_mask = np.zeros((len(examples), num_video + self.num_image_frames), bool)
    frame_mask[:, :num_video] = True
    pixel_keys = ('latent_mean', 'latent_std') if 'latent_mean' in examples[0] else ('video',)
    batch = dict(
        **{key: np.stack([e[key] for e in examples]) for key in pixel_keys},
        frame_mask=frame_mask,
        fps=np.array([e['fps'] for e in examples], np.float32),
        caption=np.array([e['caption'] for e in examples], object),
        index=np.array([e['index'] for e in examples], np.int32),
    )
    if self.tokenize_fn is not None:
      batch['input_ids'] = np.asarray(self.tokenize_fn(list(batch['caption'])), np.int32)
    if self.num_image_frames:
      captions = [c for e in examples for c in e['image_caption']]
      batch['image_caption'] = np.array(captions, object).reshape(len(examples), -1)
      if self.tokenize_fn is not None:
        ids = np.asarray(self.tokenize_fn(captions), np.int32)
        batch['image_input_ids'] = ids.reshape(len(examples), self.num_image_frames, -1)
    return batch

  # -- Iteration, optionally with a background producer. --
  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._prefetch <= 0:
      if self._finished(self._epoch):
        raise StopIteration
      batch = self.make_batch(self._epoch, self._step)
      self._epoch, self._step = self._advance(self._epoch, self._step)
      return batch
    if self._thread is None:
      self._start_prefetch()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._stop_prefetch()
      raise item
    if item is None:
      self._stop_prefetch()
      raise StopIteration
    batch, (self._epoch, self._step) = item
    return batch

  def _start_prefetch(self):
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._stop = threading.Event()
    stop, q = self._stop, self._queue

    def put(item) -> bool:
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def produce(epoch, step):
      try:
        while not self._finished(epoch):
          batch = self.make_batch(epoch, step)
          epoch, step = self._advance(epoch, step)
          if not put((batch, (epoch, step))):
            return
        put(None)
      except BaseException as e:  # pylint: disable=broad-except  # Re-raised by __next__.
        put(e)

    self._thread = threading.Thread(target=produce, args=(self._epoch, self._step), daemon=True,
                                    name='input_pipeline_prefetch')
    self._thread.start()

  def _stop_prefetch(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._thread = self._queue = self._stop = None

  def close(self):
    """Stops the prefetch thread and the decoding threads."""
    self._stop_prefetch()
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_iterator(source, *, global_batch_size: int, num_frames: int,
                  frame_stride_range: Tuple[int, int] = (1, 1), resolution: int,
                  random_crop: bool = False, caption_dropout: float = 0.0,
                  tokenize_fn: Optional[TokenizeFn] = None, num_image_frames: int = 0,
                  image_source=None, seed: int = 0, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, shuffle: bool = True,
                  num_epochs: Optional[int] = None, num_threads: int = 1,
                  prefetch: int = 0) -> VideoIterator:
  """A `VideoIterator` over a data source (anything with len() and [i]) or a TFDS builder.

  Args:
    source: `tfds.data_source(...)`, a prepared builder (its 'train' split is read) or any
      random-access sequence of {'video' uint8 [T, H, W, 3], 'caption', 'fps'} dicts.
    global_batch_size: clips per step over all processes.
    num_frames: frames per clip, F.
    frame_stride_range: (min, max) stride between sampled frames, inclusive.
    resolution: output height and width, R.
    random_crop: random instead of centre crop.
    caption_dropout: probability that a caption becomes "".
    tokenize_fn: list of B captions -> int [B, L]; adds 'input_ids' (and 'image_input_ids').
    num_image_frames: images appended after the F video frames of every clip.
    image_source: random-access source of {'image' uint8 [H, W, 3], 'caption'} dicts.
    seed: pipeline seed (>= 0).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    shuffle: a new permutation every epoch (else the split's order).
    num_epochs: stop after this many epochs (None: forever).
    num_threads: threads decoding the examples of a batch.
    prefetch: batches prepared ahead on a background thread (0: synchronous).

  Returns:
    The iterator; `next(it)` gives the batch described in the module docstring.
  """
  return VideoIterator(
      source, global_batch_size=global_batch_size, num_frames=num_frames,
      frame_stride_range=frame_stride_range, resolution=resolution, random_crop=random_crop,
      caption_dropout=caption_dropout, tokenize_fn=tokenize_fn, num_image_frames=num_image_frames,
      image_source=image_source, seed=seed, process_index=process_index,
      process_count=process_count, shuffle=shuffle, num_epochs=num_epochs,
      num_threads=num_threads, prefetch=prefetch)


def create_iterator(config: ml_collections.ConfigDict, *, tokenize_fn: Optional[TokenizeFn] = None,
                    process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> VideoIterator:
  """The iterator described by a `config.data` section (keys: module docstring)."""
  prepare = config.prepare
  source = load_source(config.dataset, data_dir=config.data_dir, split=config.split,
                       prepare=prepare)
  fraction = float(config.caption_fraction)
  if fraction < 1.0 or config.captioned_only:
    source = CaptionSubset(source, fraction, config.caption_seed, config.captioned_only)
  has_latents = 'latent_mean' in source[0]
  if has_latents != bool(config.precomputed_latents):
    raise ValueError(
        f'config.data.dataset={config.dataset!r} holds {"latents" if has_latents else "pixels"} but '
        f'config.data.precomputed_latents={config.precomputed_latents}: '
        f'set it to {has_latents}.')
  image_source = None
  if config.num_image_frames:
    if not config.image_dataset:
      raise ValueError('config.data.num_image_frames > 0 needs config.data.image_dataset.')
    image_source = load_source(config.image_dataset, data_dir=config.data_dir,
                               split=config.image_split, prepare=prepare)
  return make_iterator(
      source, global_batch_size=config.global_batch_size, num_frames=config.num_frames,
      frame_stride_range=tuple(config.frame_stride_range), resolution=config.resolution,
      random_crop=config.random_crop, caption_dropout=config.caption_dropout,
      tokenize_fn=tokenize_fn, num_image_frames=config.num_image_frames, image_source=image_source,
      seed=config.seed, process_index=process_index, process_count=process_count,
      shuffle=config.shuffle, num_epochs=config.num_epochs, num_threads=config.num_threads,
      prefetch=config.prefetch)


# ------------------------------------------------------------------------------------------------
# Host -> device.
# ------------------------------------------------------------------------------------------------
def batch_partition_spec(mesh: Mesh) -> PartitionSpec:
  """Batch axis over the mesh's data-parallel axes ('data', 'fsdp' where present)."""
  axes = tuple(a for a in ('data', 'fsdp') if a in mesh.axis_names)
  return PartitionSpec(axes if axes else None)


def to_global(batch: Batch, mesh: Mesh,
              partition_spec: Optional[PartitionSpec] = None) -> Batch:
  """Per-process numpy batch -> global `jax.Array`s sharded over the batch axis.

  Numeric arrays become global arrays of leading size local_batch * process_count; strings
  ('caption', 'image_caption') stay per-process numpy arrays. Each process's rows go to the batch
  rows its devices hold: with meshes whose devices are ordered by process (`jax.make_mesh`), that
  is rows [p * B, (p + 1) * B), so the global array is the single-process global batch.

  Args:
    batch: output of the iterator.
    mesh: the device mesh.
    partition_spec: sharding of the arrays (default: batch axis over ('data', 'fsdp')).
  """
  sharding = NamedSharding(mesh, partition_spec or batch_partition_spec(mesh))
  out = {}
  for key, value in batch.items():
    if isinstance(value, np.ndarray) and value.dtype.kind in 'biuf':
      out[key] = jax.make_array_from_process_local_data(sharding, value)
    else:
      out[key] = value
  return out
