r"""Precomputed VAE latents of a video dataset: a TFDS builder and its CLI.

Training on stored latents skips the frozen VAE encoder in every step (at SD scale it is about a
fifth of a forward pass and most of the activation memory of the input). The builder encodes every
stored clip of a prepared video dataset once, through the VAE of a checkpoint, and keeps the
posterior (mean and standard deviation) rather than one sample, so training still draws a new
sample `mean + std * eps` every step, exactly as it does from pixels.

  python -m magicvideo_jax.tools.encode_latents --source moving_shapes/default --checkpoint runs/shapes/vae/model \
      --resolution 32 --name shapes_vae [--data_dir DIR] [--splits train,validation] [--dtype float16]

writes `<data_dir>/encoded_latents/<name>/1.0.0/`. Train on it with
`--config.data.dataset=encoded_latents/<name> --config.data.precomputed_latents=True`.

Features (per clip; T stored frames, h = w = resolution / VAE factor, c latent channels):
  latent_mean   float16 or float32 [T, h, w, c]   posterior mean (unscaled: the trainer multiplies by
  latent_std    float16 or float32 [T, h, w, c]   the model's scaling_factor), standard deviation
  caption       text
  fps           float32 scalar                    frame rate of the stored frames
  index         int64                             index of the clip in the source split

Metadata (`builder.info.metadata`): the source, checkpoint, resolution and a `vae_probe`: projections
of the VAE's posterior mean on a fixed input. The trainer recomputes the probe with the VAE it holds
and refuses latents that another autoencoder produced.
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import tensorflow_datasets as tfds

from magicvideo_jax.data import input_pipeline
from magicvideo_jax.models import build_models
from magicvideo_jax.weights import checkpoint as ckpt_lib

PROBE_SIZE = 2  # Frames in the probe input.
PROBE_PROJECTIONS = 8
PROBE_RTOL = 1e-3
DTYPES = ('float16', 'float32')


# ------------------------------------------------------------------------------------------------
# The VAE fingerprint.
# ------------------------------------------------------------------------------------------------
def probe_input(resolution: int) -> np.ndarray:
  """A fixed pseudo-random `[2, R, R, 3]` image batch in [-1, 1]."""
  return np.random.default_rng(1234).uniform(-1, 1, (PROBE_SIZE, resolution, resolution, 3)
                                             ).astype(np.float32)


def probe_projections(mean: np.ndarray) -> List[float]:
  """`PROBE_PROJECTIONS` fixed random projections of a posterior mean: a short VAE fingerprint."""
  flat = np.asarray(mean, np.float64).reshape(-1)
  weights = np.random.default_rng(4321).standard_normal((PROBE_PROJECTIONS, flat.size))
  return [float(v) for v in weights @ flat / np.sqrt(flat.size)]


def vae_probe(vae, vae_params, resolution: int) -> List[float]:
  """The fingerprint of `vae_params` at `resolution` (float32)."""
  mean, _ = jax.jit(lambda p, x: vae.apply({'params': p}, x, method=vae.encode))(
      jax.tree.map(lambda v: v.astype('float32'), vae_params), probe_input(resolution))
  if not mean.is_fully_addressable:  # Parameters sharded over several hosts.
    mean = multihost_utils.process_allgather(mean, tiled=True)
  return probe_projections(jax.device_get(mean))


def check_probe(stored: Sequence[float], actual: Sequence[float], what: str) -> None:
  """Raises if two fingerprints differ by more than float noise."""
  stored, actual = np.asarray(stored, np.float64), np.asarray(actual, np.float64)
  scale = max(np.abs(stored).max(), 1e-12)
  error = np.abs(stored - actual).max() / scale
  if stored.shape != actual.shape or error > PROBE_RTOL:
    raise ValueError(f'{what}: the latents were encoded by a different VAE than the model holds '
                     f'(probe mismatch {error:.2e} > {PROBE_RTOL}); re-encode them with '
                     '`python -m magicvideo_jax.tools.encode_latents --checkpoint <the model\'s VAE>`.')


# ------------------------------------------------------------------------------------------------
# Encoding.
# ------------------------------------------------------------------------------------------------
def make_encoder(vae, vae_params, batch_frames: int) -> Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]:
  """frames uint8/float `[N, R, R, 3]` (N <= batch_frames) -> (mean, std) float32 numpy.

  One compiled program: every call is padded to `batch_frames`, split over this host's devices.
  """
  devices = np.array(jax.local_devices())
  if batch_frames % len(devices):
    raise ValueError(f'batch_frames={batch_frames} must divide by the {len(devices)} local devices')
  mesh = Mesh(devices, ('batch',))
  frame_sharding = NamedSharding(mesh, PartitionSpec('batch'))
  params = jax.device_put(vae_params, NamedSharding(mesh, PartitionSpec()))

  @jax.jit
  def encode(p, frames):
    mean, logvar = vae.apply({'params': p}, frames, method=vae.encode)
    return mean.astype(jnp.float32), jnp.exp(0.5 * logvar.astype(jnp.float32))

  def run(frames: np.ndarray):
    n = frames.shape[0]
    pixels = np.zeros((batch_frames,) + frames.shape[1:], np.float32)
    pixels[:n] = frames.astype(np.float32) * np.float32(2 / 255) - 1 if frames.dtype == np.uint8 \
        else frames
    mean, std = jax.device_get(encode(params, jax.device_put(pixels, frame_sharding)))
    return mean[:n], std[:n]

  return run


def encode_clips(clips: Iterator[Tuple[Any, np.ndarray]], encoder, batch_frames: int
                 ) -> Iterator[Tuple[Any, np.ndarray, np.ndarray]]:
  """(key, frames [T, R, R, 3]) -> (key, mean, std) in order, packing frames of consecutive clips
  into full encoder batches whatever their lengths."""
  pending: List[Tuple[Any, int]] = []  # (key, frames) waiting for their latents
  frames_buf: List[np.ndarray] = []
  done_mean: List[np.ndarray] = []
  done_std: List[np.ndarray] = []

  def flush(final: bool):
    nonlocal frames_buf
    buffered = sum(f.shape[0] for f in frames_buf)
    while buffered >= batch_frames or (final and buffered):
      stacked = np.concatenate(frames_buf)
      take, rest = stacked[:batch_frames], stacked[batch_frames:]
      mean, std = encoder(take)
      done_mean.append(mean)
      done_std.append(std)
      frames_buf = [rest] if rest.shape[0] else []
      buffered = rest.shape[0]

  def ready() -> Iterator[Tuple[Any, np.ndarray, np.ndarray]]:
    nonlocal done_mean, done_std
    mean = np.concatenate(done_mean) if done_mean else np.zeros((0,))
    std = np.concatenate(done_std) if done_std else np.zeros((0,))
    used = 0
    while pending and used + pending[0][1] <= mean.shape[0]:
      key, length = pending.pop(0)
      yield key, mean[used:used + length], std[used:used + length]
      used += length
    done_mean, done_std = ([mean[used:]], [std[used:]]) if mean.shape[0] > used else ([], [])

  for key, frames in clips:
    pending.append((key, frames.shape[0]))
    frames_buf.append(frames)
    flush(final=False)
    yield from ready()
  flush(final=True)
  yield from ready()


# ------------------------------------------------------------------------------------------------
# The builder.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EncodedLatentsConfig(tfds.core.BuilderConfig):
  """Which dataset to encode, with which VAE, at which resolution."""
  source: str = ''  # input_pipeline.load_source spec: a directory or 'name[/config][:version]'
  source_data_dir: Optional[str] = None
  checkpoint: str = ''  # a pretrained folder with a VAE (magicvideo_jax.checkpoint)
  resolution: int = 256
  splits: Tuple[str, ...] = ('train',)
  dtype: str = 'float16'
  batch_frames: int = 64


class EncodedLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Posterior mean and std of every stored frame of a video dataset (module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # tfds' own lookup needs `importlib_resources`.
    return epath.Path(__file__)

  def __init__(self, *, config: Optional[EncodedLatentsConfig] = None, **kwargs):
    if config is None:
      raise ValueError('EncodedLatents needs config=EncodedLatentsConfig(...)')
    if config.dtype not in DTYPES:
      raise ValueError(f'dtype={config.dtype!r}; choose one of {DTYPES}')
    self._model = None
    kwargs.setdefault('file_format', 'array_record')  # Random access for the input pipeline.
    super().__init__(config=config, **kwargs)

  def _load_model(self):
    if self._model is None:
      cfg = self.builder_config
      if not ckpt_lib.is_pretrained_folder(cfg.checkpoint):
        raise FileNotFoundError(f'--checkpoint {cfg.checkpoint!r} is not a pretrained folder '
                                '(config.json + params/)')
      model_config = ckpt_lib.load_config(cfg.checkpoint)
      params = ckpt_lib.load_params(cfg.checkpoint)
      if 'vae' not in params:
        raise ValueError(f'{cfg.checkpoint} holds no VAE parameters')
      vae = build_models(model_config.model)['vae']
      self._model = (model_config, vae, params['vae'])
    return self._model

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    model_config, vae, vae_params = self._load_model()
    vc = model_config.model.vae
    factor = 2 ** (len(vc.block_out_channels) - 1)
    if cfg.resolution % factor:
      raise ValueError(f'resolution={cfg.resolution} must divide by the VAE factor {factor}')
    side = cfg.resolution // factor
    shape = (None, side, side, int(vc.latent_channels))
    metadata = tfds.core.MetadataDict(
        source=cfg.source, checkpoint=os.path.abspath(cfg.checkpoint), resolution=cfg.resolution,
        vae_factor=factor, scaling_factor=float(vc.scaling_factor),
        vae_probe=vae_probe(vae, vae_params, cfg.resolution))
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'VAE posterior of {cfg.source} at {cfg.resolution}px, from {cfg.checkpoint}.',
        features=tfds.features.FeaturesDict({
            'latent_mean': tfds.features.Tensor(shape=shape, dtype=np.dtype(cfg.dtype)),
            'latent_std': tfds.features.Tensor(shape=shape, dtype=np.dtype(cfg.dtype)),
            'caption': tfds.features.Text(),
            'fps': tfds.features.Scalar(dtype=np.float32),
            'index': tfds.features.Scalar(dtype=np.int64),
        }),
        # Stored in source order: clip i here is clip i of the source, so the input pipeline draws
        # the same clips from either with the same seed.
        disable_shuffling=True,
        metadata=metadata)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.builder_config.splits}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    _, vae, vae_params = self._load_model()
    source = input_pipeline.load_source(cfg.source, data_dir=cfg.source_data_dir, split=split,
                                        prepare=True)  # Generated sources build offline.
    encoder = make_encoder(vae, vae_params, cfg.batch_frames)
    captions: Dict[int, Tuple[str, float]] = {}

    def clips():
      for index in range(len(source)):
        ex = source[index]
        captions[index] = (input_pipeline._text(ex['caption']), float(ex['fps']))  # pylint: disable=protected-access
        frames = input_pipeline.crop_frames(np.asarray(ex['video']), cfg.resolution, None)
        if index % 1000 == 0:
          logging.info('encoding %s[%d] of %d', split, index, len(source))
        yield index, frames

    dtype = np.dtype(cfg.dtype)
    for index, mean, std in encode_clips(clips(), encoder, cfg.batch_frames):
      caption, fps = captions.pop(index)
      yield index, dict(latent_mean=mean.astype(dtype), latent_std=std.astype(dtype),
                        caption=caption, fps=fps, index=index)


def read_metadata(directory: str) -> Dict[str, Any]:
  """The metadata of a prepared latents dataset (empty for any other dataset)."""
  try:
    info = tfds.builder_from_directory(directory).info
  except Exception:  # pylint: disable=broad-except  # Not a prepared dataset directory.
    return {}
  return dict(info.metadata or {}) if 'latent_mean' in info.features else {}


# ------------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--source', required=True, help="dataset to encode (dir or 'name/config')")
  parser.add_argument('--source_data_dir', default=None, help='TFDS data dir of the source')
  parser.add_argument('--checkpoint', required=True, help='pretrained folder holding the VAE')
  parser.add_argument('--resolution', type=int, required=True, help='pixels (centre crop)')
  parser.add_argument('--name', required=True, help='config name of the encoded dataset')
  parser.add_argument('--data_dir', default=None, help='where to write (default: source_data_dir)')
  parser.add_argument('--splits', default='train', help='comma-separated splits to encode')
  parser.add_argument('--dtype', default='float16', choices=DTYPES)
  parser.add_argument('--batch_frames', type=int, default=64, help='frames per encoder call')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  config = EncodedLatentsConfig(
      name=args.name, source=args.source, source_data_dir=args.source_data_dir,
      checkpoint=args.checkpoint, resolution=args.resolution,
      splits=tuple(s for s in args.splits.split(',') if s), dtype=args.dtype,
      batch_frames=args.batch_frames)
  builder = EncodedLatents(config=config, data_dir=args.data_dir or args.source_data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  print(f'wrote {builder.data_dir}: ' + ', '.join(
      f'{s} {builder.info.splits[s].num_examples} clips' for s in config.splits))
  return 0


if __name__ == '__main__':
  sys.exit(main())
