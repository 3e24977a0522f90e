r"""The LoRA miniature: a rank-8 LoRA teaches the bundled shapes model a combination it gets wrong.

  python -m benchmarks.lora_shapes --workdir runs/lora_shapes [--combination "green triangle left"]

1. Probe: judge `--probe_samples` videos of each held-out test combination (never in training)
   with the base model; the target is the combination with the lowest all-three accuracy (or
   `--combination`).
2. Data: a moving_shapes build whose train split draws half its clips from the target and half
   from the usual train combinations (configs/shapes_lora.py explains why).
3. Train the LoRA alone (configs/shapes_lora.py), export it in the diffusers / PEFT layout
   (`convert --export_lora_from`) and load it onto the base (`load_lora_weights`).
4. Judge base and base + LoRA on `--samples` videos of the target, on validation prompts (train
   combinations) and on the other held-out combinations' test prompts.

Prints a markdown table and writes WORKDIR/lora_shapes.json (the numbers of BENCHMARKS.md).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from magicvideo_jax import convert as convert_cli
from magicvideo_jax.data import input_pipeline
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.eval import judge
from magicvideo_jax.eval import shapes as shapes_eval
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = 'magicvideo_jax/assets/shapes'
SCORES = ('colour_acc', 'shape_acc', 'motion_acc', 'all_acc', 'consistency')


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _judge(pipe, prompts: Sequence[str], seed: int) -> Dict[str, float]:
  videos = shapes_eval.generate(pipe, list(prompts), batch_size=16, seed=seed)
  scores = judge.score(videos, list(prompts))
  scores.pop('judgements')
  return scores


def probe(pipe, combos: Sequence[Tuple[str, str, str]], samples: int) -> List[Tuple[float, tuple]]:
  """(all-three accuracy, combination) of each combination, `samples` videos each."""
  prompts = [moving_shapes.caption(*c) for c in combos for _ in range(samples)]
  videos = shapes_eval.generate(pipe, prompts, batch_size=16, seed=1000)
  judgements = judge.score(videos, prompts)['judgements']
  out = []
  for i, combo in enumerate(combos):
    hits = [(j['colour'], j['shape'], j['motion']) == combo
            for j in judgements[i * samples:(i + 1) * samples]]
    out.append((float(np.mean(hits)), tuple(combo)))
  return out


def build_data(data_dir: str, target: Tuple[str, str, str], train_size: int) -> str:
  train, _ = moving_shapes.split_combinations()
  config = moving_shapes.MovingShapesConfig(
      name='lora_' + '_'.join(target), train_size=train_size, validation_size=64, test_size=64,
      train_combinations=tuple([target] * len(train) + train))
  builder = moving_shapes.MovingShapes(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return input_pipeline.prepared_directory(f'moving_shapes/{config.name}', data_dir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.lora_shapes', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--base', default=BASE)
  parser.add_argument('--combination', default=None, help='"colour shape motion" (default: probe)')
  parser.add_argument('--probe_samples', type=int, default=4)
  parser.add_argument('--samples', type=int, default=32, help='videos per evaluation set')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--train_size', type=int, default=2048)
  parser.add_argument('--num_cpu_devices', type=int, default=2)
  args = parser.parse_args(argv)
  t0 = time.time()
  os.makedirs(args.workdir, exist_ok=True)
  _, heldout = moving_shapes.split_combinations()
  base = MagicVideoPipeline.from_pretrained(args.base)
  results: Dict[str, object] = dict(base=args.base, steps=args.steps)

  if args.combination:
    target = tuple(args.combination.split())
    if target not in heldout:
      raise SystemExit(f'--combination {args.combination!r} is not a held-out test combination: '
                       f'{[" ".join(c) for c in heldout]}')
  else:
    probed = probe(base, heldout, args.probe_samples)
    results['probe'] = [dict(combination=' '.join(c), all_acc=a) for a, c in probed]
    target = min(probed)[1]
    _log(f'probe ({args.probe_samples} videos each): worst {" ".join(target)} '
         f'{min(probed)[0]:.2f}; mean {np.mean([a for a, _ in probed]):.2f} ({time.time() - t0:.0f} s)')
  results['target'] = ' '.join(target)

  target_prompts = [moving_shapes.caption(*target)] * args.samples
  validation = shapes_eval.split_prompts('validation', args.samples)
  others = [p for p in shapes_eval.split_prompts('test', 4 * args.samples)
            if moving_shapes.parse_caption(p) != target][:args.samples]
  sets = dict(target=target_prompts, validation=validation, other_heldout=others)
  results['before'] = {name: _judge(base, prompts, seed=7) for name, prompts in sets.items()}
  _log(f'base judged ({time.time() - t0:.0f} s)')

  dataset = build_data(os.path.join(args.workdir, 'tfds'), target, args.train_size)
  run = os.path.join(args.workdir, 'run')
  env = dict(os.environ, PYTHONPATH=ROOT)
  t_train = time.time()
  cmd = [sys.executable, '-m', 'magicvideo_jax.main', f'--config=configs/shapes_lora.py:base={args.base}',
         f'--workdir={run}', f'--config.data.dataset={dataset}', f'--config.train.num_steps={args.steps}',
         f'--num_cpu_devices={args.num_cpu_devices}']
  _log(' '.join(cmd))
  subprocess.run(cmd, cwd=ROOT, env=env, check=True)
  results['train_seconds'] = time.time() - t_train
  lora_dir = os.path.join(args.workdir, 'lora')
  convert_cli.main(['--export_lora_from', run, '--output', lora_dir])
  results['lora_files'] = {n: os.path.getsize(os.path.join(lora_dir, n)) for n in os.listdir(lora_dir)}
  tuned = MagicVideoPipeline.from_pretrained(args.base).load_lora_weights(lora_dir)
  results['after'] = {name: _judge(tuned, prompts, seed=7) for name, prompts in sets.items()}
  results['seconds'] = time.time() - t0

  with open(os.path.join(args.workdir, 'lora_shapes.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print(f'LoRA rank 8 on {args.base}, {args.steps} steps ({results["train_seconds"]:.0f} s); target '
        f'"{" ".join(target)}"; {args.samples} videos per set')
  print('| set | model | colour | shape | motion | all three | consistency |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for name in sets:
    for model in ('before', 'after'):
      s = results[model][name]
      print(f'| {name} | {"base" if model == "before" else "base + LoRA"} | '
            + ' | '.join(f'{s[k]:.3f}' for k in SCORES) + ' |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
