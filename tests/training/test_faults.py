"""The fault and bad-input matrix: each case a user hit is one line on stderr with a non-zero exit, and
nothing good is lost. Training cases run `magicvideo_jax.main` in subprocesses (slow)."""

import errno
import json
import os
import subprocess
import sys

import pytest

from magicvideo_jax import sample

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(ROOT, 'magicvideo_jax', 'assets', 'shapes')
PYTHON = sys.executable


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  return env


def _error_lines(stderr):
  """The lines a person reads: absl/XLA log lines and TF's banner left out."""
  return [l for l in stderr.strip().splitlines()
          if l and not l.startswith(('I', 'W', 'E0', 'WARNING: All log'))
          and 'oneDNN' not in l and 'absl::InitializeLog' not in l]


# ------------------------------------------------------------------------------------------------
# Sampling flags: checked before any weights load.


@pytest.mark.parametrize('flag, value, match', [
    ('--guidance_scale', 'nan', 'guidance_scale=nan must be finite'),
    ('--guidance_scale', 'inf', 'guidance_scale=inf must be finite'),
    ('--eta', 'nan', 'eta=nan must be finite'),
    ('--fps', 'nan', 'fps=nan must be finite'),
    ('--seed', '99999999999999999999', 'seed=99999999999999999999 must be in'),
    ('--steps', '0', 'num_inference_steps=0 must be >= 1'),
])
def test_sample_refuses_bad_numbers_before_loading(tmp_path, capsys, flag, value, match):
  code = sample.main(['--checkpoint', SHAPES, '--prompt', 'a red circle moving left', '--output',
                      str(tmp_path / 'x.mp4'), flag, value])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and match in err[0], err
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------
# Training program: bad inputs fail before any work, in one line.


def _main(tmp_path, *args, timeout=600):
  cmd = [PYTHON, '-m', 'magicvideo_jax.main', *args]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # Three interpreter starts with jax and TensorFlow.
def test_main_config_and_workdir_errors_are_one_line(tmp_path):
  (tmp_path / 'a_file').write_text('x')
  cases = [
      (['--config=configs/tiny.py', f'--workdir={tmp_path / "w1"}', '--config.train.num_step=3'],
       2, 'Did you mean "num_steps"'),
      (['--config=configs/nope.py', f'--workdir={tmp_path / "w2"}'], 2, 'configs/nope.py'),
      (['--config=configs/tiny.py', f'--workdir={tmp_path / "a_file"}'], 1, 'a_file'),
  ]
  for args, code, match in cases:
    proc = _main(tmp_path, *args)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == code and len(lines) == 1 and match in lines[0], (args, proc.stderr[-3000:])
    assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w1').exists() and not (tmp_path / 'w2').exists()  # Nothing was created.


def _train_args(workdir, data_dir, *overrides):
  return ['--config=configs/tiny.py', f'--workdir={workdir}', '--num_cpu_devices=1',
          f'--config.data.data_dir={data_dir}', '--config.data.prefetch=0',
          '--config.train.export=False', '--config.train.async_checkpointing=False', *overrides]


def _steps(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


@pytest.mark.slow  # Training programs.
def test_training_faults(tmp_path, shapes_data_dir):
  """One workdir through the rows of the matrix that need a trained checkpoint."""
  workdir = str(tmp_path / 'run')
  # A blow-up that reaches a checkpoint step: the diverged state is not saved, the error names the
  # last good checkpoint (step 1: Orbax saves the first step; its learning rate is 0 in warm-up), and
  # a rerun with a sane learning rate resumes from it.
  proc = _main(tmp_path, *_train_args(workdir, shapes_data_dir, '--config.train.learning_rate=1e30',
                                      '--config.train.checkpoint_every=2', '--config.train.log_every=1',
                                      '--config.train.num_steps=4'))
  lines = _error_lines(proc.stderr)
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert 'FloatingPointError' in lines[0] and 'last good checkpoint is step 1' in lines[0], lines
  assert _steps(workdir) == [1]
  proc = _main(tmp_path, *_train_args(workdir, shapes_data_dir, '--config.train.checkpoint_every=2',
                                      '--config.train.num_steps=4'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _steps(workdir) == [1, 2, 4]
  config = json.load(open(os.path.join(workdir, 'config.json')))  # The whole config: in a file.
  assert config['train']['num_steps'] == 4
  assert max(len(l) for l in proc.stderr.splitlines()) < 1000  # No hyperparameter dump line.

  # Resuming with another model: refused before restoring, naming the key.
  proc = _main(tmp_path, *_train_args(workdir, shapes_data_dir,
                                      '--config.model.text_encoder.intermediate_size=96',
                                      '--config.train.num_steps=6'))
  lines = _error_lines(proc.stderr)
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert 'model.text_encoder.intermediate_size' in lines[0] and 'allow_config_change' in lines[0]

  # A second run while the first holds the workdir.
  holder = subprocess.Popen([PYTHON, '-c', (
      'import sys, time; sys.path.insert(0, sys.argv[1]);'
      'from magicvideo_jax.training import workdir as w; lock = w.WorkdirLock(sys.argv[2]);'
      'lock.acquire(); print("held", flush=True); time.sleep(600)'), ROOT, workdir],
      stdout=subprocess.PIPE, text=True, env=_env())
  try:
    assert holder.stdout.readline().strip() == 'held'
    proc = _main(tmp_path, *_train_args(workdir, shapes_data_dir, '--config.train.num_steps=6'))
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1 and 'in use by pid' in lines[0], proc.stderr[-3000:]
  finally:
    holder.kill()
    holder.wait()

  # The newest checkpoint truncated: moved aside with one warning, the previous one resumes. (The
  # lock of the killed holder is stale and taken over.)
  state = os.path.join(workdir, 'checkpoints', '4', 'state')
  largest = max((os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs), key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  proc = _main(tmp_path, *_train_args(workdir, shapes_data_dir, '--config.train.checkpoint_every=2',
                                      '--config.train.num_steps=6'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'checkpoint step 4 is unusable' in proc.stderr and 'resuming from' in proc.stderr
  # Orbax's worker threads may still log tracebacks of the failed restore (seen in one fresh venv,
  # not in another): counted, not asserted; the warning above is the one line that matters.
  print('tracebacks in the log of the resumed run:', proc.stderr.count('Traceback'))
  assert _steps(workdir) == [2, 4, 6] and os.listdir(os.path.join(workdir, 'checkpoints_corrupt'))


@pytest.mark.slow  # A training program.
def test_disk_full_at_a_save_stops_the_run(tmp_path, shapes_data_dir, monkeypatch):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.training import train  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.weights import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.update(data_dir=shapes_data_dir, prefetch=0)
  config.train.update(num_steps=6, checkpoint_every=2, export=False, async_checkpointing=False)
  real_save = ckpt_lib.save_train_state

  def save(manager, step, *args, **kwargs):
    if step >= 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib, 'save_train_state', save)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r'step 4 failed .*No space left.*last good checkpoint is step 2'):
    train.train_and_evaluate(config, str(tmp_path))
  assert _steps(str(tmp_path)) == [1, 2]  # Orbax also saves the first step.
