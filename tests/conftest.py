"""Test setup: 8 fake CPU devices for sharding tests, float32 everywhere, shared fixtures."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('KERAS_HOME', os.path.join(os.path.dirname(__file__), '..', '.keras'))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import tempfile

import pytest

# Compiled programs are shared between tests and the subprocesses they start.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'magicvideo_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


@pytest.fixture(scope='session')
def shapes_data_dir(tmp_path_factory):
  """A TFDS data dir holding moving_shapes/tiny (8 frames of 32x32; 256/64/64 clips)."""
  import tensorflow_datasets as tfds
  from data import moving_shapes
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = moving_shapes.MovingShapes(config='tiny', data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir
