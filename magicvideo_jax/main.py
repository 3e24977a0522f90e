r"""Entry point: train a model described by a config, in a workdir it resumes from.

  python -m magicvideo_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      [--config.train.num_steps=100 ...]

`--config=FILE:ARG` passes ARG to the file's `get_config(arg)` (e.g. a stage variant); `--config.a.b=v`
overrides a key, and a mistyped key fails at once, naming it. Several processes (hosts) join with
`--coordinator_address`, `--num_processes`, `--process_id` (or the cluster's own environment, e.g. on a
TPU pod or under Slurm, with `--distributed`).
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from magicvideo_jax import config as config_lib
from magicvideo_jax.training import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() with the cluster environment.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_NUM_CPU_DEVICES = flags.DEFINE_integer('num_cpu_devices', None,
                                        'Fake CPU devices per process (development and tests).')
_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir', 'auto',
    'Persistent XLA compilation cache, so a rerun or resume skips recompiling. "auto": '
    '$JAX_COMPILATION_CACHE_DIR or ~/.cache/magicvideo_jax/xla for single-process runs, off for '
    'multi-process ones (on CPU with gloo it was seen to hang there); "": off; a path: always on.')
flags.mark_flags_as_required(['config', 'workdir'])


def setup_logging() -> None:
  """INFO from this project, warnings only from Orbax's very chatty checkpoint internals."""
  logging.set_verbosity(logging.INFO)
  quiet = lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname
  handler = logging.get_absl_handler()
  for h in (handler, handler.python_handler, *std_logging.getLogger().handlers):
    h.addFilter(quiet)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Keys a config file leaves out are at their defaults before anything reads the config.
  config = config_lib.fill_defaults(_CONFIG.value)
  setup_logging()
  multi_process = bool(_COORDINATOR.value or _DISTRIBUTED.value)
  cache_dir = _CACHE_DIR.value
  if cache_dir == 'auto':
    cache_dir = '' if multi_process else os.environ.get(
        'JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.cache', 'magicvideo_jax', 'xla'))
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
  else:  # Also overrides a $JAX_COMPILATION_CACHE_DIR that jax read at import.
    jax.config.update('jax_enable_compilation_cache', False)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', float(
        os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 1.0)))
  if _NUM_CPU_DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _NUM_CPU_DEVICES.value)
  if _COORDINATOR.value or _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info('process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
