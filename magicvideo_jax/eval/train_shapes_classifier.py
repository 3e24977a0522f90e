r"""Trains the moving_shapes video classifier whose features give FVD-shapes and FID-shapes.

  python -m magicvideo_jax.eval.train_shapes_classifier --output magicvideo_jax/assets/shapes_classifier \
      [--num_train 4096 --steps 500 --batch_size 32 --learning_rate 3e-3 --seed 0]

Clips come from the dataset's own generator (`moving_shapes.make_example`, default config: 16 frames of
32x32): the first `num_train` of 'train', rendered once and held in memory. Loss: the sum of the three
softmax cross-entropies (colour, shape, motion). Afterwards the accuracies on the 512 'validation' and
512 'test' clips (test: colour-shape-motion combinations never seen in train) are measured, and the
folder gets `model.safetensors`, `config.json`, `metrics.json` and a PROVENANCE.md with this command.
"""

import argparse
import datetime
import os
import shlex
import sys
import time
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magicvideo_jax import eval as eval_lib
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.models import shapes_classifier as sc

LABELS = tuple(name for name, _ in sc.HEADS)


def load_clips(split: str, start: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
  """uint8 videos `[N, 16, 32, 32, 3]` and labels `[N, 3]` (colour, shape, motion) of a split."""
  config = moving_shapes.MovingShapesConfig(name='default')
  videos = np.empty((count, config.num_frames, config.resolution, config.resolution, 3), np.uint8)
  labels = np.empty((count, len(LABELS)), np.int32)
  for i in range(count):
    example = moving_shapes.make_example(split, start + i, config)
    videos[i] = example['video']
    labels[i] = [example[name] for name in LABELS]
  return videos, labels


def accuracy(model, params, videos: np.ndarray, labels: np.ndarray,
             batch_size: int = 64) -> Dict[str, float]:
  apply = jax.jit(lambda p, x: model.apply({'params': p}, sc.to_model_input(x))[1])
  predicted = []
  for start in range(0, len(videos), batch_size):
    logits = apply(params, videos[start:start + batch_size])
    predicted.append(np.stack([np.argmax(logits[name], -1) for name in LABELS], -1))
  hits = np.concatenate(predicted) == labels
  out = {name: float(hits[:, i].mean()) for i, name in enumerate(LABELS)}
  out['all'] = float(hits.all(axis=1).mean())
  return out


def train(num_train: int, steps: int, batch_size: int, learning_rate: float, seed: int,
          log=print):
  """(model, params, seconds of training) on the first `num_train` train clips."""
  videos, labels = load_clips('train', 0, num_train)
  model = sc.ShapesClassifier()
  params = model.init(jax.random.key(seed), sc.to_model_input(videos[:2]))['params']
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
  optimizer = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = optimizer.init(params)

  def loss_fn(p, x, y):
    _, logits = model.apply({'params': p}, sc.to_model_input(x))
    losses = [optax.softmax_cross_entropy_with_integer_labels(logits[name], y[:, i]).mean()
              for i, name in enumerate(LABELS)]
    return sum(losses), jnp.stack(losses)

  @jax.jit
  def step_fn(p, state, x, y):
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, parts

  rng = np.random.default_rng(seed)
  t0 = time.time()
  for step in range(steps):
    index = rng.integers(num_train, size=batch_size)
    params, opt_state, parts = step_fn(params, opt_state, videos[index], labels[index])
    if step % 50 == 0 or step == steps - 1:
      parts = np.asarray(parts)
      log(f'step {step:4d}  loss colour {parts[0]:.3f} shape {parts[1]:.3f} motion {parts[2]:.3f}'
          f'  ({time.time() - t0:.0f} s)')
  return model, params, time.time() - t0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.train_shapes_classifier',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--output', required=True)
  parser.add_argument('--num_train', type=int, default=4096)
  parser.add_argument('--steps', type=int, default=500)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--learning_rate', type=float, default=3e-3)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)

  def log(text):
    print(text, file=sys.stderr, flush=True)

  t0 = time.time()
  model, params, train_seconds = train(args.num_train, args.steps, args.batch_size,
                                       args.learning_rate, args.seed, log)
  metrics = dict(train_seconds=round(train_seconds, 1), num_train=args.num_train, steps=args.steps,
                 num_params=int(sum(v.size for v in jax.tree.leaves(params))))
  for split in ('validation', 'test'):
    metrics[split] = accuracy(model, params, *load_clips(split, 0, 512))
    log(f'{split}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics[split].items()))
  sc.save(args.output, model, params)
  eval_lib.write_json(os.path.join(args.output, 'metrics.json'), metrics)
  size = os.path.getsize(os.path.join(args.output, sc.PARAMS_FILE))
  rows = '\n'.join(f'| {split} (512 clips) | ' + ' | '.join(f'{metrics[split][k]:.4f}'
                                                            for k in LABELS + ('all',)) + ' |'
                   for split in ('validation', 'test'))
  command = 'python -m magicvideo_jax.eval.train_shapes_classifier ' + shlex.join(argv)
  with open(os.path.join(args.output, 'PROVENANCE.md'), 'w') as f:
    f.write(f"""# Bundled moving_shapes classifier (the feature network of FVD-shapes / FID-shapes)

Produced on {datetime.date.today().isoformat()} on the shared 2-core development machine (run under
`nice -n 10`) by

    {command}

`magicvideo_jax/models/shapes_classifier.py` ({metrics['num_params']} parameters, `{sc.PARAMS_FILE}`
{size / 1e6:.2f} MB), trained on the first {args.num_train} 'train' clips of moving_shapes (default
config) for {args.steps} steps of {args.batch_size}: {train_seconds:.0f} s of training,
{time.time() - t0:.0f} s in all with rendering and evaluation.

Accuracy of the three heads:

| split | colour | shape | motion | all three |
|---|---|---|---|---|
{rows}

The test split holds colour-shape-motion combinations that never occur in train. `metrics.json` holds
the same numbers.
""")
  log(f'wrote {args.output} ({time.time() - t0:.0f} s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
