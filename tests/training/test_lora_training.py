"""LoRA training end to end: `main` trains the adapters alone, `convert --export_lora_from` writes
them in the PEFT layout, and `sample --lora` on the base model samples what the run's own export
samples."""

import os
import re
import subprocess
import sys

from flax import traverse_util
import imageio.v3 as iio
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from magicvideo_jax import convert as convert_cli
from magicvideo_jax import sample as sample_cli
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import lora_io

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params_at(workdir, step):
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return traverse_util.flatten_dict(state['params'], sep='/')


@pytest.mark.slow  # One tiny training run (a compile) and two samplings.
def test_lora_run_trains_adapters_only_and_exports(tmp_path, shapes_data_dir, capsys):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'magicvideo_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', '--num_cpu_devices=1', f'--config.data.data_dir={shapes_data_dir}',
         '--config.data.prefetch=0', '--config.train.num_steps=3', '--config.train.checkpoint_every=3',
         '--config.train.log_every=1', '--config.train.warmup_steps=1',
         '--config.train.learning_rate=1e-2', '--config.lora.rank=2', '--config.lora.alpha=4',
         '--config.train.trainable=("^lora/",)', '--config.eval.every_steps=2']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # Evaluated at step 2 and at the last step; the better one is kept beside the latest ones.
  losses = {int(s): float(v) for s, v in
            re.findall(r'evaluation at step (\d+): .*?eval_loss=([-\d.e+]+)', proc.stderr)}
  assert sorted(losses) == [2, 3]
  best = [int(d) for d in os.listdir(os.path.join(workdir, ckpt_lib.BEST_DIR)) if d.isdigit()]
  assert best == [min(losses, key=losses.get)] or losses[2] == losses[3]
  first, last = _params_at(workdir, 1), _params_at(workdir, 3)
  adapters = [k for k in last if k.startswith('lora/')]
  assert adapters and all(k.endswith(('/lora_A', '/lora_B')) for k in adapters)
  moved = [k for k in adapters if not np.array_equal(first[k], last[k])]
  base_moved = [k for k in last if not k.startswith('lora/') and not np.array_equal(first[k], last[k])]
  print(f'{len(moved)}/{len(adapters)} adapter tensors moved between steps 1 and 3; '
        f'{len(base_moved)} base tensors moved')
  assert moved and not base_moved
  assert any(np.abs(last[k]).max() > 0 for k in adapters if k.endswith('lora_B'))

  lora_dir = str(tmp_path / 'lora')
  convert_cli.main(['--export_lora_from', workdir, '--output', lora_dir])
  assert os.path.isfile(os.path.join(lora_dir, lora_io.IMAGE_FILE))

  # The base model: the run's export without its adapters (what the run started from).
  model = ckpt_lib.model_folder(workdir)
  config, params, tokenizer = ckpt_lib.load_pretrained(model)
  base_dir = str(tmp_path / 'base')
  base_config = config.copy_and_resolve_references()
  base_config.lora.rank = 0
  ckpt_lib.save_pretrained(base_dir, base_config, {k: v for k, v in params.items() if k != 'lora'},
                           tokenizer)
  own = pipeline_lib.MagicVideoPipeline.from_pretrained(model)
  loaded = pipeline_lib.MagicVideoPipeline.from_pretrained(base_dir).load_lora_weights(lora_dir)
  own_flat, loaded_flat = (traverse_util.flatten_dict(jax.device_get(p.params), sep='/')
                           for p in (own, loaded))
  assert own_flat.keys() == loaded_flat.keys()
  worst = max(float(np.abs(own_flat[k] - loaded_flat[k]).max() / np.abs(own_flat[k]).max())
              for k in own_flat if np.abs(own_flat[k]).max() > 0)
  print(f'run export (adapters folded at alpha / rank) vs base + exported LoRA: max rel err '
        f'{worst:.1e}')
  assert worst <= 1e-5  # The scale multiplies lora_B before the product instead of after.
  raw = traverse_util.flatten_dict(params, sep='/')
  assert any(not np.array_equal(own_flat[k], raw[k]) for k in own_flat)  # The adapters count.

  outputs = []
  for flags in ([], ['--lora', lora_dir]):
    out = str(tmp_path / f'video{len(outputs)}.gif')
    assert sample_cli.main(['--checkpoint', base_dir, '--prompt', 'a red circle moving left',
                            '--output', out, '--steps', '3', *flags]) == 0
    outputs.append(out)
  own_out = str(tmp_path / 'own.gif')
  assert sample_cli.main(['--checkpoint', model, '--prompt', 'a red circle moving left', '--output',
                          own_out, '--steps', '3']) == 0
  capsys.readouterr()
  plain, with_lora, own_video = (iio.imread(p) for p in (*outputs, own_out))
  assert np.abs(with_lora.astype(int) - own_video.astype(int)).max() <= 1
  assert not np.array_equal(plain, with_lora)
  with pytest.raises(SystemExit, match='no LoRA adapters'):
    convert_cli.main(['--export_lora_from', base_dir, '--output', str(tmp_path / 'none')])
