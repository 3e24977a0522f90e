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
