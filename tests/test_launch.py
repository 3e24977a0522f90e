"""launch/stage.sh, the stage runner the miniature recipes share, with a stand-in for main.py."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stands in for `python -m magicvideo_jax.main`: logs its arguments, writes the stage's export unless
# told to fail, and prints one progress line and one line the runner should drop.
FAKE_PYTHON = r'''#!/usr/bin/env bash
echo "$@" >> "$CALLS"
for arg in "$@"; do [[ $arg == --workdir=* ]] && workdir="${arg#--workdir=}"; done
echo "I1203 train.py:1] [5] loss=0.5" >&2
echo "noise that is not progress"
[[ "${FAIL:-0}" == 1 ]] && exit 1
mkdir -p "$workdir/model" && echo {} > "$workdir/model/config.json"
'''


def _run(tmp_path, script, **env):
  fake = tmp_path / 'python'
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), RUNS=str(tmp_path / 'runs'), CALLS=str(tmp_path / 'calls'),
             **env)
  return subprocess.run(['bash', '-c', f'set -euo pipefail; start=$(date +%s); '
                         f'source launch/stage.sh; {script}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_trains_once_then_skips_the_finished_stage(tmp_path):
  proc = _run(tmp_path, 'train_stage ae configs/cmd_shapes.py:ae --config.x=1; '
                        'train_stage ae configs/cmd_shapes.py:ae --config.x=1')
  assert proc.returncode == 0, proc.stderr
  calls = (tmp_path / 'calls').read_text().splitlines()
  assert calls == [f'-m magicvideo_jax.main --config=configs/cmd_shapes.py:ae '
                   f'--workdir={tmp_path}/runs/ae --config.x=1']
  assert '[ae] I1203 train.py:1] [5] loss=0.5' in proc.stdout
  assert 'noise' not in proc.stdout and 'done already' in proc.stdout


def test_a_stage_without_export_stops_the_recipe(tmp_path):
  proc = _run(tmp_path, 'train_stage motion configs/cmd_shapes.py:motion; echo after', FAIL='1')
  assert proc.returncode == 1 and 'stage motion failed' in proc.stderr
  assert 'after' not in proc.stdout
