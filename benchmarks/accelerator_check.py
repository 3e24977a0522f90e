r"""One script for a lent accelerator: MagicVideo's sampling headline, the train step, attention kernels.

  python -m benchmarks.accelerator_check                 # sd15_256 on the local GPU / TPU chips
  python -m benchmarks.accelerator_check --tiny          # configs/tiny.py sizes: the CPU self-test
  python -m benchmarks.accelerator_check --json out.json

Prints, with random weights (speed and memory do not depend on their values):
  (a) sampling: one 16x256x256 clip, 50 DDIM steps with classifier-free guidance, bf16 compute:
      compile seconds, sampling seconds, peak device memory;
  (b) the train step (configs/sd15_256.py, bf16) at the largest per-device batch that fits: compile
      seconds, step seconds, model FLOP/s and MFU against the chip's dense bf16 peak, peak memory;
  (c) cuDNN flash attention against XLA's at the U-Net's shapes: max error and speed.
It needs jax, flax, optax, orbax-checkpoint, transformers, einops, numpy and ml_collections; it never
imports TensorFlow, TFDS or clu (it says which of them are absent) and finishes in a few minutes on one
H100/H200-class GPU (`--budget_s` stops the batch search early).
"""

import argparse
import importlib
import importlib.util
import json
import sys
import time
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax import tokenizer as tok_lib
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline
from magicvideo_jax.training import state as state_lib

OPTIONAL = ('tensorflow', 'tensorflow_datasets', 'clu')
# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor data sheets).
PEAK_BF16 = (('NVIDIA H200', 989e12), ('NVIDIA H100', 989e12), ('NVIDIA A100', 312e12),
             ('NVIDIA L4', 121e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12),
             ('TPU v5p', 459e12), ('TPU v6', 918e12))


def _importable(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ImportError:
    return False


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def peak_flops(device) -> Optional[float]:
  for prefix, value in PEAK_BF16:
    if device.device_kind.startswith(prefix):
      return value
  return None


def peak_memory(device) -> Optional[int]:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def memory_limit(device) -> Optional[int]:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def load_config(tiny: bool):
  module = importlib.import_module('configs.tiny' if tiny else 'configs.sd15_256')
  config = module.get_config() if tiny else module.get_config('video')
  config.model.dtype = 'bfloat16'
  return config


def random_params(config, modules, mesh, seed: int = 0):
  """Random params of every model, placed replicated (sampling) on the mesh."""
  rules = tuple(tuple(r) for r in config.sharding.logical_axis_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, config, k)))(
        jax.random.key(seed))


# ----------------------------------------------------------------------------------------------------
# (a) sampling


def check_sampling(config, mesh, *, steps: int) -> Dict[str, Any]:
  config = config.copy_and_resolve_references()
  tokenizer = tok_lib.WordTokenizer(['a', 'red', 'circle', 'moving', 'left'],
                                    config.model.text_encoder.max_position_embeddings)
  t0 = time.time()
  modules = models_lib.build_models(config.model)
  params = random_params(config, modules, mesh)
  init_s = time.time() - t0
  pipe = MagicVideoPipeline(config, params, tokenizer, modules=modules, mesh=mesh)
  settings = dict(num_frames=int(config.data.num_frames), height=int(config.data.resolution),
                  width=int(config.data.resolution), num_inference_steps=steps, guidance_scale=7.5,
                  sampler='ddim', seed=0, output_type='latent')
  t0 = time.time()
  pipe('a red circle moving left', **settings)  # Compiles, then runs once.
  first_s = time.time() - t0
  t0 = time.time()
  latents = pipe('a red circle moving left', **dict(settings, seed=1))
  sample_s = time.time() - t0
  t0 = time.time()
  pipe.decode(latents)
  decode_first_s = time.time() - t0
  t0 = time.time()
  pipe.decode(latents)
  decode_s = time.time() - t0
  return dict(clip=f'{settings["num_frames"]}x{settings["height"]}x{settings["width"]}',
              steps=steps, guidance_scale=7.5, dtype=config.model.dtype, init_s=round(init_s, 2),
              compile_and_first_s=round(first_s, 2), denoise_s=round(sample_s, 3),
              decode_s=round(decode_s, 3), decode_compile_and_first_s=round(decode_first_s, 2),
              peak_memory_bytes=peak_memory(jax.local_devices()[0]))


# ----------------------------------------------------------------------------------------------------
# (b) the train step


def random_batch(batch_struct: Dict[str, jax.ShapeDtypeStruct], seed: int = 0) -> Dict[str, jax.Array]:
  out = {}
  for i, (name, s) in enumerate(sorted(batch_struct.items())):
    key = jax.random.key(seed + i)
    if jnp.issubdtype(s.dtype, jnp.integer):
      value = jax.jit(lambda k, s=s: jax.random.randint(k, s.shape, 0, 8, s.dtype),
                      out_shardings=s.sharding)(key)
    elif s.dtype == jnp.bool_:
      value = jax.jit(lambda s=s: jnp.ones(s.shape, s.dtype), out_shardings=s.sharding)()
    elif name == 'fps':
      value = jax.jit(lambda s=s: jnp.full(s.shape, 8.0, s.dtype), out_shardings=s.sharding)()
    else:
      value = jax.jit(lambda k, s=s: jnp.clip(jax.random.normal(k, s.shape, s.dtype), -1, 1),
                      out_shardings=s.sharding)(key)
    out[name] = value
  return out


def check_train_step(config, mesh, *, batches: List[int], timed_steps: int,
                     budget_s: float) -> Dict[str, Any]:
  device = jax.local_devices()[0]
  limit = memory_limit(device)
  tried = []
  start = time.time()
  for per_device in batches:
    if time.time() - start > budget_s:
      tried.append(dict(per_device_batch=per_device, skipped='time budget spent'))
      break
    trial = config.copy_and_resolve_references()
    trial.data.global_batch_size = per_device * mesh.size
    setup = state_lib.create_train_state(trial, mesh)
    try:
      compiled, compile_s = setup.compile()
    except Exception as e:  # pylint: disable=broad-except  # Out of memory at compile time.
      tried.append(dict(per_device_batch=per_device, error=f'{type(e).__name__}: {str(e)[:200]}'))
      continue
    analysis = compiled.memory_analysis()
    needed = None
    if analysis is not None:
      needed = int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                   + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    record = dict(per_device_batch=per_device, compile_s=round(compile_s, 1), compiled_bytes=needed)
    if limit is not None and needed is not None and needed > limit:
      record['skipped'] = f'needs {needed / 2**30:.1f} GiB of {limit / 2**30:.1f}'
      tried.append(record)
      continue
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) if cost else 0.0
    state = setup.jit_init(setup.init_key)
    batch = random_batch(setup.batch_struct)
    for _ in range(2):  # Warm up (first runs allocate).
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.time()
    for _ in range(timed_steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.time() - t0) / timed_steps
    peak = peak_flops(device)
    record.update(step_s=round(step_s, 4), flops_per_device=flops,
                  tflops_per_s=round(flops / step_s / 1e12, 2),
                  mfu=round(flops / step_s / peak, 4) if peak else None,
                  loss=float(jax.device_get(metrics['loss'])),
                  peak_memory_bytes=peak_memory(device))
    tried.append(record)
    return dict(fits=record, tried=tried)
  return dict(fits=None, tried=tried)


# ----------------------------------------------------------------------------------------------------
# (c) attention kernels


def unet_attention_shapes(config, batch: int) -> List[Dict[str, int]]:
  """(name, B, query length, key length, heads, head dim) of the U-Net's attention calls."""
  unet, data = config.model.unet, config.data
  latent = data.resolution // 2 ** (len(config.model.vae.block_out_channels) - 1)
  heads = unet.attention_head_dim
  shapes = []
  for level, channels in enumerate(unet.block_out_channels[:-1]):
    n_heads = heads[level] if isinstance(heads, (list, tuple)) else heads
    tokens = (latent // 2 ** level) ** 2
    head_dim = channels // n_heads
    frames = batch * data.num_frames
    shapes.append(dict(name=f'spatial L{level}', batch=frames, q=tokens, k=tokens, heads=n_heads,
                       head_dim=head_dim))
    shapes.append(dict(name=f'temporal L{level}', batch=batch * tokens, q=data.num_frames,
                       k=data.num_frames, heads=n_heads, head_dim=head_dim))
    shapes.append(dict(name=f'cross L{level}', batch=frames, q=tokens,
                       k=config.model.text_encoder.max_position_embeddings, heads=n_heads,
                       head_dim=head_dim))
  return shapes


def _timed(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.time()
    jax.block_until_ready(fn(*args))
    times.append(time.time() - t0)
  return float(np.median(times))


def check_attention(config, *, batch: int) -> List[Dict[str, Any]]:
  gpu = jax.default_backend() == 'gpu'
  rows = []
  for shape in unet_attention_shapes(config, batch):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (shape['batch'], shape['q'], shape['heads'], shape['head_dim']),
                          jnp.bfloat16)
    k, v = (jax.random.normal(key, (shape['batch'], shape['k'], shape['heads'], shape['head_dim']),
                              jnp.bfloat16) for key in keys[1:])
    xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla'))
    row = dict(shape, xla_s=round(_timed(xla, q, k, v), 6))
    if not gpu:
      row['cudnn'] = 'skipped: no GPU'
    else:
      cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='cudnn'))
      try:
        reference = np.asarray(xla(q, k, v), np.float32)
        error = float(np.max(np.abs(np.asarray(cudnn(q, k, v), np.float32) - reference)))
        row.update(cudnn_s=round(_timed(cudnn, q, k, v), 6), max_abs_error=error,
                   speedup=round(row['xla_s'] / _timed(cudnn, q, k, v), 2))
      except Exception as e:  # pylint: disable=broad-except  # A shape cuDNN does not take.
        row['cudnn'] = f'not supported: {type(e).__name__}: {" ".join(str(e).split())[:160]}'
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.accelerator_check',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--tiny', action='store_true', help='configs/tiny.py sizes (CPU self-test)')
  parser.add_argument('--steps', type=int, default=50, help='sampling steps (default 50)')
  parser.add_argument('--batches', default='8,4,2,1', help='per-device train batches to try')
  parser.add_argument('--timed_steps', type=int, default=5)
  parser.add_argument('--budget_s', type=float, default=300.0,
                      help='stop trying train batches after this many seconds')
  parser.add_argument('--skip', default='', help='comma list of sections to skip: sampling,train,'
                      'attention')
  parser.add_argument('--json', default=None, help='also write the results to this file')
  args = parser.parse_args(argv)
  absent = [m for m in OPTIONAL if not _importable(m)]
  device = jax.local_devices()[0]
  results: Dict[str, Any] = dict(
      backend=jax.default_backend(), device_kind=device.device_kind, devices=jax.device_count(),
      jax=jax.__version__, absent_optional_packages=absent)
  log(f'{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__};'
      f' not installed (not needed): {", ".join(absent) or "none"}')
  config = load_config(args.tiny)
  mesh = sharding_lib.create_mesh({'data': -1, 'fsdp': 1})
  skip = set(filter(None, args.skip.split(',')))
  t_all = time.time()
  if 'sampling' not in skip:
    log('(a) sampling ...')
    results['sampling'] = check_sampling(config, mesh, steps=args.steps)
    log(json.dumps(results['sampling']))
  if 'train' not in skip:
    log('(b) train step ...')
    results['train_step'] = check_train_step(
        config, mesh, batches=[int(b) for b in args.batches.split(',')],
        timed_steps=args.timed_steps, budget_s=args.budget_s)
    log(json.dumps(results['train_step']))
  if 'attention' not in skip:
    log('(c) attention ...')
    results['attention'] = check_attention(config, batch=2)  # CFG doubles one clip's batch.
    for row in results['attention']:
      log(json.dumps(row))
  results['total_s'] = round(time.time() - t_all, 1)
  text = json.dumps(results, indent=1)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
