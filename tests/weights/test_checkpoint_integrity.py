"""Training checkpoints: checksummed, a broken newest one moved aside for the previous, a changed model
refused before any restore work, a non-finite state never saved."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from magicvideo_jax.weights import checkpoint as ckpt_lib


def _config(width=8):
  return ml_collections.ConfigDict(dict(model=dict(width=width, name='tiny'),
                                        train=dict(objective='diffusion', trainable=('.*',))))


def _state(value):
  return dict(w=jnp.full((64, 64), value, jnp.float32), b=jnp.arange(16, dtype=jnp.float32) * value,
              step=jnp.int32(value))


def _manager(workdir):
  return ckpt_lib.make_manager(str(workdir), keep=5, save_interval_steps=1, async_save=False)


def _write(workdir, steps=(1, 2)):
  manager = _manager(workdir)
  for step in steps:
    ckpt_lib.save_train_state(manager, step, _state(float(step)), {'position': step}, _config())
  manager.wait_until_finished()
  return manager


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def _restore(workdir, config=None, **kwargs):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
  return ckpt_lib.restore_latest(_manager(workdir), abstract, config or _config(), **kwargs)


def test_intact_checkpoints_restore_the_newest(tmp_path):
  _write(tmp_path)
  step, state, data = _restore(tmp_path)
  assert step == 2 and data == {'position': 2}
  np.testing.assert_array_equal(state['w'], np.full((64, 64), 2.0, np.float32))
  assert _restore(tmp_path / 'empty') is None


def _flip(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'metadata', 'state'])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
  manager = _write(tmp_path)
  folder = os.path.join(manager.directory, '2')
  if damage == 'flip':
    _flip(_largest_file(os.path.join(folder, 'state')))
  elif damage == 'truncate':
    _truncate(_largest_file(os.path.join(folder, 'state')))
  elif damage == 'metadata':
    os.remove(os.path.join(folder, 'state', '_METADATA'))
  else:
    shutil.rmtree(os.path.join(folder, 'state'))
  step, state, data = _restore(tmp_path)
  assert step == 1 and data == {'position': 1}
  np.testing.assert_array_equal(state['w'], np.ones((64, 64), np.float32))
  aside = os.listdir(tmp_path / ckpt_lib.CORRUPT_DIR)
  assert len(aside) == 1 and aside[0].startswith('2.')  # Moved, not deleted.
  assert sorted(os.listdir(manager.directory)) == ['1']
  warnings = [r for r in caplog.records if 'unusable' in r.getMessage()]
  assert len(warnings) == 1


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
  manager = _write(tmp_path)
  for step in ('1', '2'):
    shutil.rmtree(os.path.join(manager.directory, step, 'state'))
  with pytest.raises(ckpt_lib.CheckpointError, match='no usable checkpoint'):
    _restore(tmp_path)


def test_a_changed_model_config_is_refused_before_restoring(tmp_path):
  _write(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.width: 8 -> 96"):
    _restore(tmp_path, _config(width=96))
  assert not os.path.exists(tmp_path / ckpt_lib.CORRUPT_DIR)  # Nothing was moved.
  step, _, _ = _restore(tmp_path, _config(width=96), allow_config_change=True)
  assert step == 2


def test_a_non_finite_state_is_not_saved(tmp_path):
  manager = _write(tmp_path, steps=(1,))
  bad = _state(3.0)
  bad['w'] = bad['w'].at[0, 0].set(jnp.nan)
  with pytest.raises(ckpt_lib.NonFiniteStateError, match='not saved .*last good checkpoint is step 1'):
    ckpt_lib.save_train_state(manager, 3, bad, {}, _config(), force=True)
  diverged = _state(3.0)  # Finite, but its squares overflow: a learning rate of 1e30 gives this.
  diverged['b'] = diverged['b'].at[2].set(2e29)
  with pytest.raises(ckpt_lib.NonFiniteStateError, match='diverged'):
    ckpt_lib.save_train_state(manager, 3, diverged, {}, _config(), force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [1]


def test_checksums_see_any_changed_byte():
  state = _state(1.0)
  base, finite = ckpt_lib.state_fingerprint(state)
  assert finite
  for value in (np.nextafter(np.float32(1), np.float32(2)), 0.0, 2.0):  # 1 -> 2: bits + 2**23.
    changed = dict(state, w=state['w'].at[5, 7].set(value))
    assert ckpt_lib.state_fingerprint(changed)[0] != base
  swapped = dict(state, b=state['b'][::-1])
  assert ckpt_lib.state_fingerprint(swapped)[0] != base
  assert ckpt_lib.state_fingerprint(dict(state))[0] == base


def test_a_url_workdir_reaches_orbax_unchanged(monkeypatch):
  seen = {}

  class Manager:
    def __init__(self, directory, options=None):
      seen['directory'] = directory

  monkeypatch.setattr(ckpt_lib.ocp, 'CheckpointManager', Manager)
  ckpt_lib.make_manager('gs://bucket/runs/mv', keep=1, save_interval_steps=1)
  assert str(seen['directory']) == 'gs://bucket/runs/mv/checkpoints'  # Never <cwd>/gs:/...
  assert str(ckpt_lib.as_path('gs://bucket/x')) == 'gs://bucket/x'
  assert str(ckpt_lib.as_path('rel/dir')) == os.path.abspath('rel/dir')


def test_config_differences_read_missing_sections_at_their_defaults():
  """A checkpoint written before a config section existed (here `lora`) still matches a run at that
  section's defaults; a LoRA run against it does not (its state has the adapters)."""
  config = tiny.get_config()
  stored = json.loads(ckpt_lib.config_to_json(config))
  del stored['lora']
  assert ckpt_lib.config_differences(stored, config) == []
  config.lora.rank = 4
  assert ckpt_lib.config_differences(stored, config) == ['lora.rank: 0 -> 4']
