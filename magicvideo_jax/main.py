r"""Entry point: train a model described by a config, in a workdir it resumes from.

  python -m magicvideo_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      [--config.train.num_steps=100 ...]

`--config=NAME` (e.g. `tiny`, `shapes:arg`) names a shipped config, so the installed `magicvideo-train`
works from any folder; `--config=FILE:ARG` passes ARG to the file's `get_config(arg)` (e.g. a stage variant); `--config.a.b=v`
overrides a key, and a mistyped key fails at once, naming it. Several processes (hosts) join with
`--coordinator_address`, `--num_processes`, `--process_id` (or the cluster's own environment, e.g. on a
TPU pod or under Slurm, with `--distributed`).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from magicvideo_jax import cli
from magicvideo_jax import config as config_lib
from magicvideo_jax.training import train
from magicvideo_jax.training import workdir as workdir_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]) or a shipped config by name (tiny[:arg]).',
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
    '$JAX_COMPILATION_CACHE_DIR or ~/.cache/magicvideo_jax/xla, on every backend and host count '
    'except several CPU processes (gloo was seen to hang there); "": off; a path: always on.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of an expected failure too.')
flags.mark_flags_as_required(['config', 'workdir'])

# Failures a user can fix (a path, a config value, a checkpoint, a full disk, a NaN): one line each.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, PermissionError, FileExistsError,
                   NotADirectoryError, IsADirectoryError, OSError, FloatingPointError,
                   ckpt_lib.CheckpointError, workdir_lib.WorkdirLockedError)


def setup_logging() -> None:
  """INFO from this project, warnings only from Orbax's very chatty checkpoint internals."""
  logging.set_verbosity(logging.INFO)
  quiet = lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname
  handler = logging.get_absl_handler()
  for h in (handler, handler.python_handler, *std_logging.getLogger().handlers):
    h.addFilter(quiet)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _one_line(error: BaseException) -> str:
  """An error's message on one line, unescaped (ml_collections wraps KeyErrors in AttributeErrors,
  whose str() is a repr with escaped quotes and newlines)."""
  text = str(error)
  if len(text) > 1 and text[0] == text[-1] and text[0] in '"\'':
    text = text[1:-1]
  text = text.replace('\\n', ' ').replace("\\'", "'").replace('\\"', '"')
  return ' '.join(text.split()) or type(error).__name__


def parse_flags(argv):
  """absl's flag parsing, with a bad flag, a missing config file or an unknown config key (with its
  'Did you mean' suggestion) as one line and exit status 2 instead of chained tracebacks."""
  try:
    return flags.FLAGS(config_lib.resolve_config_flag(argv))
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    what = 'bad config override' if isinstance(e, (AttributeError, KeyError)) else 'bad flag'
    print(f'{os.path.basename(argv[0])}: error: {what}: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)


def setup_compilation_cache(multi_process: bool) -> None:
  cache_dir = _CACHE_DIR.value
  if cache_dir == 'auto':
    # Several CPU processes (development, tests) hung in the cache with gloo; accelerators gain most.
    cpu_hosts = multi_process and jax.default_backend() == 'cpu'
    cache_dir = '' if cpu_hosts else os.environ.get(
        'JAX_COMPILATION_CACHE_DIR',
        os.path.join(os.path.expanduser('~'), '.cache', 'magicvideo_jax', 'xla'))
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', float(
        os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 1.0)))
  else:  # Also overrides a $JAX_COMPILATION_CACHE_DIR that jax read at import.
    jax.config.update('jax_enable_compilation_cache', False)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Keys a config file leaves out are at their defaults before anything reads the config; the file
  # itself is read here, before the workdir is touched.
  try:
    config = config_lib.fill_defaults(_CONFIG.value)
  except (OSError, AttributeError, KeyError, ValueError, TypeError) as e:
    print(f'python -m magicvideo_jax.main: error: --config: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)
  setup_logging()
  multi_process = bool(_COORDINATOR.value or _DISTRIBUTED.value)
  if _NUM_CPU_DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _NUM_CPU_DEVICES.value)
  if multi_process:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  setup_compilation_cache(multi_process)
  logging.info('process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except EXPECTED_ERRORS as e:
    if _VERBOSE.value:
      raise
    logging.flush()
    print(f'python -m magicvideo_jax.main: error: {type(e).__name__}: {_one_line(e)}',
          file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
  """The `magicvideo-train` console script."""
  cli.prepare_console_script(__name__)
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
