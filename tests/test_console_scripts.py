"""Shipped configs by name (`--config=tiny`), and `pip install .` giving working console scripts in a
fresh virtualenv (slow: it builds and installs the project, then runs each script from outside the
repository)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest

from magicvideo_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('magicvideo-train', 'magicvideo-sample', 'magicvideo-convert', 'magicvideo-flops',
           'magicvideo-eval')


def test_shipped_config_names(tmp_path, monkeypatch):
  names = config_lib.shipped_config_names()
  assert {'tiny', 'sd15_256', 'shapes', 'cmd_shapes'} <= set(names), names
  monkeypatch.chdir(tmp_path)  # Outside the repository: configs/ is not here.
  tiny = os.path.join(config_lib.SHIPPED_CONFIGS, 'tiny.py')
  assert config_lib.resolve_config_file('tiny') == tiny
  assert config_lib.resolve_config_file('tiny:video') == tiny + ':video'
  assert config_lib.resolve_config_file('configs/tiny.py:video') == tiny + ':video'
  for kept in ('nonexistent', 'gs://bucket/tiny.py', 'other/tiny.py', '../tiny'):
    assert config_lib.resolve_config_file(kept) == kept
  argv = ['prog', '--config=sd15_256', '--config.train.num_steps=2', '--config', 'tiny:x']
  assert config_lib.resolve_config_flag(argv) == [
      'prog', f'--config={os.path.join(config_lib.SHIPPED_CONFIGS, "sd15_256.py")}',
      '--config.train.num_steps=2', '--config', tiny + ':x']
  (tmp_path / 'tiny').write_text('')  # An existing file wins over a shipped name.
  assert config_lib.resolve_config_file('tiny') == 'tiny'


def test_configs_that_import_others_load_by_package_name():
  import importlib  # pylint: disable=g-import-not-at-top
  for name in ('cmd_shapes', 'shapes_lora', 'shapes_unsupervised', 'vdm_256'):
    module = importlib.import_module(f'magicvideo_jax.configs.{name}')
    assert module.get_config() is not None, name


def _run(command, cwd, env, timeout=600):
  t0 = time.time()
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  return result, time.time() - t0


@pytest.mark.slow  # Builds and installs the project; each script starts jax (about 1 min in all).
def test_pip_install_gives_console_scripts(tmp_path):
  """`pip install --no-deps --no-build-isolation .` into a fresh venv that sees this venv's packages
  (so nothing is downloaded), then every console script from a folder outside the repository."""
  src = tmp_path / 'src'  # A copy, so the build leaves nothing in the checkout.
  src.mkdir()
  for name in ('pyproject.toml', 'README.md', 'LICENSE'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  for name in ('configs', 'magicvideo_jax'):
    shutil.copytree(os.path.join(ROOT, name), src / name, symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__'))
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, 'test_venv_packages.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')  # jax, torch, ... without reinstalling them.
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env['PATH'] = f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}'
  result, seconds = _run([python, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '-q',
                          str(src)], str(tmp_path), env)
  assert result.returncode == 0, result.stderr[-2000:]
  print(f'pip install: {seconds:.1f} s')
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  result, _ = _run([python, '-c', 'import magicvideo_jax; print(magicvideo_jax.__file__)'],
                   str(outside), env)
  assert result.stdout.startswith(str(venv)), result.stdout + result.stderr[-2000:]

  for script in SCRIPTS:
    result, seconds = _run([str(venv / 'bin' / script), '--help'], str(outside), env)
    output = result.stdout + result.stderr
    print(f'{script} --help: rc {result.returncode}, {seconds:.1f} s')
    # absl's --help exits 1 (argparse's 0); either way it lists the script's own flags.
    assert result.returncode in (0, 1) and ('--config' in output or '--output' in output
                                            or '--checkpoint' in output), output[-2000:]
    assert 'Traceback' not in output, output[-3000:]

  # Real commands. A shipped config by name, its file found in the installed package:
  result, seconds = _run([str(venv / 'bin' / 'magicvideo-flops'), '--config=tiny', '--no_memory',
                          '--json'], str(outside), env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report['denoiser']['xla'] > 0
  print(f'magicvideo-flops --config=tiny: {seconds:.1f} s')
  # The train CLI reads the named config and its overrides (an unknown key fails, naming it).
  result, _ = _run([str(venv / 'bin' / 'magicvideo-train'), '--config=tiny',
                    f'--workdir={tmp_path / "run"}', '--config.train.no_such_key=1'],
                   str(outside), env)
  assert result.returncode == 2 and 'no_such_key' in result.stderr, result.stderr[-2000:]
  # The bundled shapes model, shipped in the package, exported to a diffusers folder.
  bundle = subprocess.run([python, '-c', 'import os, magicvideo_jax; print(os.path.join(os.path.'
                           'dirname(magicvideo_jax.__file__), "assets", "shapes"))'],
                          cwd=str(outside), env=env, capture_output=True, text=True).stdout.strip()
  result, seconds = _run([str(venv / 'bin' / 'magicvideo-convert'), '--export_from', bundle,
                          '--output', 'exported'], str(outside), env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (outside / 'exported' / 'model_index.json').is_file()
  print(f'magicvideo-convert --export_from <installed shapes bundle>: {seconds:.1f} s')
