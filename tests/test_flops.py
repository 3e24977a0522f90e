"""FLOPs accounting: the analytic count agrees with XLA's; the CLI prints parseable JSON; the train
step it reports is the one train_and_evaluate compiles.

Nothing here runs a model: every count compiles abstract inputs.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from configs import vdm_64
from magicvideo_jax import flops
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.05


@pytest.fixture(scope='module')
def tiny_cli_report():
  """`python -m magicvideo_jax.flops --config=configs/tiny.py --json --no_memory`, parsed."""
  out = subprocess.run(
      [sys.executable, '-m', 'magicvideo_jax.flops', '--config=configs/tiny.py', '--json',
       '--no_memory'], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def tiny_vdm_config():
  config = vdm_64.get_config()
  config.model.update(dtype='float32', remat=False)
  config.model.vdm.update(base_channels=32, channel_mult=(1, 2), head_dim=16, embed_dim=64,
                          norm_num_groups=8, attention_resolutions=(16, 8), resolution=16,
                          num_frames=8, context_dim=32)
  config.model.text_encoder.update(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=16)
  config.data.update(num_frames=8, resolution=16, global_batch_size=2)
  return config


def _check(name, entry):
  ratio = entry['analytic']['total'] / entry['xla']
  print(f'{name}: XLA {entry["xla"]:.6g}, analytic {entry["analytic"]["total"]:.6g} '
        f'(multiply-adds only {entry["analytic"]["core"]:.6g}), analytic/XLA {ratio:.4f}')
  assert abs(ratio - 1) < TOLERANCE, (name, ratio)


def test_valid_taps_matches_xla_conv():
  """A SAME 3x3 conv and a stride-2 conv: the analytic count is XLA's, tap for tap."""
  for stride, pad in ((1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))):
    fn = lambda a, b, s=stride, p=pad: jax.lax.conv_general_dilated(
        a, b, (s, s), p, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    x = jax.ShapeDtypeStruct((2, 12, 10, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)
    xla = flops.xla_flops(fn, x, k)['flops']
    tally = flops.Tally()
    tally.conv(2, 12, 10, 8, 4, stride=stride, pad=pad)
    conv = tally.result()['conv']
    print(f'stride {stride} pad {pad}: XLA {xla:.0f}, valid taps {conv}, naive '
          f'{2 * 2 * 12 * 10 // stride ** 2 * 9 * 8 * 4}')
    assert conv == xla


@pytest.mark.slow
def test_unet_forward_analytic_matches_xla(tiny_cli_report):
  r = tiny_cli_report
  assert r['kind'] == 'magicvideo' and r['frames'] == tiny.get_config().data.num_frames
  _check('tiny U-Net forward', r['denoiser'])
  assert r['per_clip']['xla'] == pytest.approx(r['denoiser']['xla'] * r['steps'] * 2)


@pytest.mark.slow
def test_vae_decode_analytic_matches_xla(tiny_cli_report):
  _check('tiny VAE decode', tiny_cli_report['vae_decode'])
  _check('tiny text encoder', tiny_cli_report['text_encoder'])


@pytest.mark.slow
def test_cli_json_fields(tiny_cli_report):
  r = tiny_cli_report
  for key in ('denoiser', 'per_clip', 'per_clip_total', 'vae_decode', 'text_encoder', 'convention'):
    assert key in r, key
  assert 'multiply-add = 2' in r['convention']
  assert r['denoiser']['params'] > 0 and r['steps'] == tiny.get_config().sampling.num_inference_steps
  assert r['per_clip_total']['xla'] > r['per_clip']['xla']


def test_vdm_forward_analytic_matches_xla():
  config = tiny_vdm_config()
  r = flops.count_flops(config, memory=False)
  assert r['kind'] == 'vdm' and 'vae_decode' not in r
  assert r['denoiser']['input_shape'] == [1, 8, 16, 16, 3]
  _check('tiny VDM forward', r['denoiser'])
  # Attention levels follow the design resolution: both levels here, so attention FLOPs are > 0.
  assert r['denoiser']['analytic']['attention'] > 0


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_train_step_report_is_the_step_train_and_evaluate_compiles(shapes_data_dir, tmp_path,
                                                                   monkeypatch):
  """train_and_evaluate's own create_train_state arguments (real first batch) compile to the FLOPs
  and memory that flops.train_step_cost reports from the config alone."""
  config = tiny.get_config()
  config.data.update(data_dir=shapes_data_dir, prefetch=0)
  calls = []

  class Stop(Exception):
    pass

  def spy(*args, **kwargs):
    calls.append((args, kwargs))
    raise Stop

  monkeypatch.setattr(state_lib, 'create_train_state', spy)
  with pytest.raises(Stop):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  (run_config, mesh), kwargs = calls[0]
  assert set(kwargs) == {'modules', 'batch_struct'}
  compiled, _ = state_lib.create_train_state(run_config, mesh, **kwargs).compile()
  report = flops.train_step_cost(tiny.get_config())
  print(f'train step: {report["flops"]:.6g} FLOPs per device on {report["devices"]} devices, '
        f'memory {report["memory"]}')
  assert report['devices'] == mesh.size
  assert report['flops'] == float(flops._cost(compiled)['flops'])  # pylint: disable=protected-access
  assert report['memory'] == flops._memory(compiled)  # pylint: disable=protected-access
