r"""CPU speed of our U-Nets against diffusers (PyTorch, eager), per forward.

1. Image U-Net: the *same weights* (a random diffusers `UNet2DConditionModel` converted by
   `magicvideo_jax.convert`) through our `UNet` (video extensions off) and through diffusers, at
   SD 1.5 widths, latent 32x32, batch 2, in float32 and bfloat16 (both sides fully bf16: weights and
   activations). The float32 outputs are compared (max relative error printed).
2. Video U-Net: our MagicVideo `UNet` (adaptors, parallel temporal attention, fps) against
   `diffusers.UNet3DConditionModel` (temporal convs + temporal transformers) at the same widths,
   16 frames, batch 1. Different architectures, random weights: a speed comparison only.

torch runs with `torch.set_num_threads(N)`, N = the JAX (XLA:CPU) thread count = the CPUs this process
may use. Sizes are flags, so a quick run at small widths checks that everything works:

  python -m benchmarks.unet_cpu                                    # SD 1.5 sizes (minutes)
  python -m benchmarks.unet_cpu --widths=32,64,64,64 --heads=4 --norm_groups=8 --context_dim=64 \
      --latent=16 --frames=4 --repeats=2
"""

import os
import statistics
import time
from typing import Callable, Dict, List

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_WIDTHS = flags.DEFINE_list('widths', ['320', '640', '1280', '1280'], 'block_out_channels.')
_HEADS = flags.DEFINE_integer('heads', 8, 'Attention heads (SD 1.x: 8 at every level).')
_LAYERS = flags.DEFINE_integer('layers_per_block', 2, 'Res blocks per level.')
_GROUPS = flags.DEFINE_integer('norm_groups', 32, 'GroupNorm groups.')
_CONTEXT_DIM = flags.DEFINE_integer('context_dim', 768, 'Text embedding width.')
_CONTEXT_LEN = flags.DEFINE_integer('context_len', 77, 'Text tokens.')
_LATENT = flags.DEFINE_integer('latent', 32, 'Latent height = width.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Image U-Net batch.')
_FRAMES = flags.DEFINE_integer('frames', 16, 'Video U-Net frames (batch 1).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed forwards per entry (median reported).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_SKIP_VIDEO = flags.DEFINE_bool('skip_video', False, 'Only the image U-Net.')
_SKIP_IMAGE = flags.DEFINE_bool('skip_image', False, 'Only the video U-Net.')


def cpu_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
  fn()  # Warm-up (and, for JAX, compile).
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def unet_fields(widths: List[int], video: bool) -> Dict:
  from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
  cfg = common.unet_sd15()
  cfg.update(block_out_channels=tuple(widths), layers_per_block=_LAYERS.value,
             attention_head_dim=_HEADS.value, cross_attention_dim=_CONTEXT_DIM.value,
             norm_num_groups=_GROUPS.value, num_frames=max(_FRAMES.value, 1))
  if not video:
    cfg = common.image_only(cfg)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()}


def bench_image(rows: List[List[str]]) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.weights import torch_layout
  from magicvideo_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  widths = [int(w) for w in _WIDTHS.value]
  b, s = _BATCH.value, _LATENT.value
  torch.manual_seed(0)
  ref = UNet2DConditionModel(
      sample_size=s, block_out_channels=tuple(widths), layers_per_block=_LAYERS.value,
      attention_head_dim=_HEADS.value, cross_attention_dim=_CONTEXT_DIM.value,
      norm_num_groups=_GROUPS.value).eval()
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, 1, s, s, 4)).astype(np.float32)
  t = np.array([500] * b, np.int32)
  ctx = rng.standard_normal((b, _CONTEXT_LEN.value, _CONTEXT_DIM.value)).astype(np.float32)
  fields = unet_fields(widths, video=False)
  template = jax.eval_shape(UNet(**fields).init, jax.random.key(0), x[:, :, :8, :8], t, ctx)['params']
  params32 = torch_layout.state_dict_to_params(state, template)
  outputs = {}
  for dtype in _DTYPES.value:
    jdt = jnp.dtype(dtype)
    model = UNet(**fields, dtype=jdt, param_dtype=jdt)
    params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, jdt), params32))
    apply = jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))
    args = (params, jnp.asarray(x, jdt), jnp.asarray(t), jnp.asarray(ctx, jdt))
    t0 = time.perf_counter()
    apply.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    outputs[('jax', dtype)] = np.asarray(apply(*args).astype(jnp.float32))[:, 0]
    sec = median_seconds(lambda: apply(*args).block_until_ready(), _REPEATS.value)
    rows.append(['image U-Net', f'JAX/XLA {dtype}', f'{b}x{s}x{s}', f'{sec:.3f}',
                 f'compile {compile_s:.1f} s'])

    tdt = getattr(torch, dtype)
    model_t = ref.to(tdt)
    xt = torch.from_numpy(x[:, 0]).permute(0, 3, 1, 2).to(tdt)
    tt = torch.from_numpy(t).long()
    ct = torch.from_numpy(ctx).to(tdt)

    def run_torch():
      with torch.no_grad():
        return model_t(xt, tt, ct).sample

    outputs[('torch', dtype)] = run_torch().float().permute(0, 2, 3, 1).numpy()
    sec = median_seconds(run_torch, _REPEATS.value)
    rows.append(['image U-Net', f'diffusers {dtype}', f'{b}x{s}x{s}', f'{sec:.3f}', 'eager'])
  for dtype in _DTYPES.value:
    a, r = outputs[('jax', dtype)], outputs[('torch', dtype)]
    err = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-12))
    rows.append(['image U-Net', f'max rel err JAX vs torch ({dtype})', '', '', f'{err:.2e}'])
  ref.to(torch.float32)


def bench_video(rows: List[List[str]]) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet3DConditionModel  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  widths = [int(w) for w in _WIDTHS.value]
  f, s = _FRAMES.value, _LATENT.value
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, f, s, s, 4)).astype(np.float32)
  t = np.array([500], np.int32)
  ctx = rng.standard_normal((1, _CONTEXT_LEN.value, _CONTEXT_DIM.value)).astype(np.float32)
  fps = np.array([8.0], np.float32)
  fields = unet_fields(widths, video=True)
  torch.manual_seed(0)
  ref = UNet3DConditionModel(
      sample_size=s, block_out_channels=tuple(widths), layers_per_block=_LAYERS.value,
      attention_head_dim=max(widths[0] // _HEADS.value, 1), cross_attention_dim=_CONTEXT_DIM.value,
      norm_num_groups=_GROUPS.value).eval()
  n_torch = sum(p.numel() for p in ref.parameters())
  for dtype in _DTYPES.value:
    jdt = jnp.dtype(dtype)
    model = UNet(**fields, dtype=jdt, param_dtype=jdt)
    params = jax.jit(lambda k: model.init(k, x[:, :, :8, :8], t, ctx, fps=fps)['params'])(
        jax.random.key(0))
    n_ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    apply = jax.jit(lambda p, x, t, c, fps: model.apply({'params': p}, x, t, c, fps=fps))
    args = (params, jnp.asarray(x, jdt), jnp.asarray(t), jnp.asarray(ctx, jdt), jnp.asarray(fps))
    t0 = time.perf_counter()
    apply.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    sec = median_seconds(lambda: apply(*args).block_until_ready(), _REPEATS.value)
    rows.append(['video U-Net', f'JAX/XLA MagicVideo {dtype}', f'1x{f}x{s}x{s}', f'{sec:.3f}',
                 f'compile {compile_s:.1f} s; {n_ours / 1e6:.1f} M params'])

    tdt = getattr(torch, dtype)
    model_t = ref.to(tdt)
    xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).to(tdt)  # [B, C, F, H, W]
    tt = torch.from_numpy(t).long()
    ct = torch.from_numpy(ctx).to(tdt)

    def run_torch():
      with torch.no_grad():
        return model_t(xt, tt, ct).sample

    sec = median_seconds(run_torch, _REPEATS.value)
    rows.append(['video U-Net', f'diffusers UNet3D {dtype}', f'1x{f}x{s}x{s}', f'{sec:.3f}',
                 f'eager; {n_torch / 1e6:.1f} M params'])


class _PrintedRows(list):
  """Rows that are also printed as they come: a long run killed half-way still reports."""

  def append(self, row):
    print(' | '.join(row), flush=True)
    super().append(row)


def main(argv) -> None:
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  threads = cpu_threads()
  torch.set_num_threads(threads)
  rows: List[List[str]] = _PrintedRows()
  if not _SKIP_IMAGE.value:
    bench_image(rows)
  if not _SKIP_VIDEO.value:
    bench_video(rows)
  print(f'CPU forward seconds (median of {_REPEATS.value}); widths {_WIDTHS.value}, {threads} threads '
        f'(torch.set_num_threads({threads}); XLA:CPU uses {jax.devices()[0].device_kind} x '
        f'{threads}); jax {jax.__version__}, torch {torch.__version__}')
  widths = [max(len(r[i]) for r in rows + [['model', 'implementation', 'input', 'seconds', 'notes']])
            for i in range(5)]
  fmt = '  '.join(f'{{:<{w}}}' for w in widths)
  print(fmt.format('model', 'implementation', 'input', 'seconds', 'notes'))
  for r in rows:
    print(fmt.format(*r))


if __name__ == '__main__':
  app.run(main)
