"""TFDS builder for a local folder of captioned images, for joint image-video training (LaVie).

Features (the contract shared by every image dataset in `data/`):
  'image'    uint8 [H, W, 3]  H = W = resolution, except with resize_mode='shorter_side'
  'caption'  text
  'filename' text             path relative to image_dir

Captions CSV: `path,caption` (path relative to image_dir). Missing, empty or unreadable images are
skipped and listed in the log and in `build_report.json` next to the dataset, as in video_folder.py.

Usage:
  builder = ImageFolder(image_dir='/data/laion_subset', resolution=256, data_dir='/data/tfds')
  builder.download_and_prepare()
  source = builder.as_data_source('train')
"""

import dataclasses
import os
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from magicvideo_jax.data import video_folder


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """What the builder stores; fields as in `video_folder.VideoFolderConfig`."""
  image_dir: str = ''
  csv_path: str = ''
  resolution: int = 256
  resize_mode: str = 'center_crop'


def make_config(image_dir: str, csv_path: Optional[str] = None, *, name: Optional[str] = None,
                **kwargs) -> ImageFolderConfig:
  """An ImageFolderConfig named `<folder>_<res>px` unless `name` is given."""
  config = ImageFolderConfig(name='_', image_dir=image_dir,
                             csv_path=csv_path or os.path.join(image_dir, 'captions.csv'), **kwargs)
  if config.resize_mode not in video_folder.RESIZE_MODES:
    raise ValueError(f'resize_mode must be one of {video_folder.RESIZE_MODES}, '
                     f'got {config.resize_mode!r}.')
  if name is None:
    folder = os.path.basename(os.path.normpath(image_dir)) or 'images'
    name = f'{folder}_{config.resolution}px'
    if config.resize_mode != 'center_crop':
      name += f'_{config.resize_mode}'
  return dataclasses.replace(config, name=name)


def read_image(path: str, config: ImageFolderConfig) -> List[Dict[str, Any]]:
  """Decodes and resizes one image file: a one-element list of {'image'}."""
  with Image.open(path) as im:
    im.load()  # Decode now, so a truncated file fails here and not later.
    image = np.asarray(im.convert('RGB'))
  image = video_folder.resize(image, config.resolution, config.resize_mode)
  return [dict(image=np.ascontiguousarray(image, np.uint8))]


class ImageFolder(video_folder.RobustFolderBuilder):
  """Captioned images from a local folder. See the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, config: Optional[ImageFolderConfig] = None, image_dir: Optional[str] = None,
               csv_path: Optional[str] = None, num_workers: int = 4,
               data_dir: Optional[str] = None, **config_kwargs):
    """Either a `config` or `image_dir` (+ ImageFolderConfig fields as keyword arguments)."""
    if config is None:
      if image_dir is None:
        raise ValueError('ImageFolder needs `config=make_config(...)` or `image_dir=...`.')
      config = make_config(image_dir, csv_path, **config_kwargs)
    elif image_dir is not None or config_kwargs:
      raise ValueError('Pass either `config` or `image_dir` and its options, not both.')
    self._num_workers = num_workers
    super().__init__(config=config, data_dir=data_dir, file_format='array_record')

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    side = c.resolution if c.resize_mode != 'shorter_side' else None
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Captioned images from {c.image_dir} ({c.csv_path}) at {c.resolution}px '
                    f'({c.resize_mode}).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(side, side, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'caption': tfds.features.Text(),
            'filename': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    c = self.builder_config
    if not os.path.isfile(c.csv_path):
      raise FileNotFoundError(f'Captions CSV not found: {c.csv_path} (set csv_path).')
    rows = video_folder.read_rows(c.csv_path, c.image_dir, allow_webvid=False)
    return {'train': self._generate_examples(rows)}

  def _generate_examples(self, rows: List[video_folder.Row]):
    load = lambda path: read_image(path, self.builder_config)
    return self._generate_rows(rows, load, self._num_workers)
