r"""Where the compiled train step's memory goes: the largest buffers live at the peak, by op.

Compiles the train step `magicvideo_jax.flops.train_setup` builds (abstract inputs, nothing runs) with
XLA's buffer-assignment dump on, then reads the dump: `compiled.memory_analysis()` totals, the
values live at the heap peak (the dump's live ranges), each with its HLO instruction, shape and
the JAX op name from the HLO metadata, and the same grouped by op with layer indices folded (so that
e.g. the softmax of every spatial attention shows as one line).

  python -m benchmarks.memory_breakdown --config=configs/sd15_256.py --num_cpu_devices 1 \
      --mesh data=1,fsdp=1 --config.data.global_batch_size=1 [--top 30] [--json]
  python -m benchmarks.memory_breakdown --config=configs/sd15_256.py --residuals 8  # no compile
  python -m benchmarks.memory_breakdown --remat_probe  # does this compiler keep jax.checkpoint?

Only the memory of one program: XLA:CPU's buffer assignment (what this machine can compile), which
upcasts bf16 dots/convolutions to f32 and schedules differently from GPU/TPU.
"""

import atexit
import collections
import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=False)
_MESH = flags.DEFINE_string('mesh', None, 'Mesh, e.g. "data=8,fsdp=1" (default config.mesh).')
_DEVICES = flags.DEFINE_integer('num_cpu_devices', None, 'Fake CPU devices.')
_TOP = flags.DEFINE_integer('top', 25, 'Rows per table.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON document.')
_RESIDUALS = flags.DEFINE_integer(
    'residuals', 0, 'Instead of compiling: the activations autodiff saves for the backward of '
    'this many clips (traced; per device = global batch / batch shards).')
_PROBE = flags.DEFINE_bool('remat_probe', False, 'Only check whether this backend keeps remat.')
_DUMP = flags.DEFINE_string('dump_dir', None, 'Keep the XLA dump here (default: a temp dir).')

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(')
_OPNAME = re.compile(r'op_name="([^"]*)"')


def _short_op(op_name: str) -> str:
  """`jit(train_step)/.../transpose(jvp(UNet))/down_blocks_0/.../dot_general` -> a readable key:
  the module path without the jit/jvp wrappers, ending in the primitive."""
  tag = 'bwd:' if 'transpose(' in op_name else 'fwd:' if 'jvp(' in op_name else ''
  op = re.sub(r'jit\([^)]*\)/', '', op_name)
  op = re.sub(r'(transpose|jvp|checkpoint|remat|rematted_computation|vmap|pjit)\(', '', op)
  return tag + op.replace(')', '') if op else ''



def parse_hlo(text: str) -> Dict[str, Dict[str, str]]:
  """Instruction name -> {'shape', 'opcode', 'op_name'} from HLO text."""
  out = {}
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    op = _OPNAME.search(line)
    out[name] = dict(shape=shape, opcode=opcode, op_name=op.group(1) if op else '')
  return out


def parse_peak(text: str) -> Dict[str, Any]:
  """The values live at the heap peak from a `*live-range.txt` dump (section
  `Live ranges at T (peak):`, lines `name{index}: N bytes (cumulative: M bytes)`)."""
  m = re.search(r'Live ranges at (\d+) \(peak\):\n', text)
  if not m:
    return dict(time=None, values=[])
  values = []
  for line in text[m.end():].splitlines():
    v = re.match(r'^\s+([\w.\-]+)\{([\d,]*)\}: (\d+) bytes', line)
    if not v:
      break
    values.append(dict(instruction=v.group(1), index=v.group(2), size=int(v.group(3))))
  seq = re.search(r'^\s+%s:([\w.\-]+)$' % m.group(1), text, re.M)
  return dict(time=int(m.group(1)), at=seq.group(1) if seq else '', values=values)


def _group_key(op: str) -> str:
  """Layer indices folded (`down_blocks_0/attentions_1` -> `down_blocks_N/attentions_N`)."""
  return re.sub(r'_\d+', '_N', op)


def _fmt(x: float) -> str:
  for unit, scale in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if abs(x) >= scale:
      return f'{x / scale:.2f} {unit}'
  return f'{x:.0f} B'


def breakdown(dump_dir: str, top: int = 25) -> Dict[str, Any]:
  """The values live at the peak of the train step's heap, largest first and grouped by op."""
  files = sorted(glob.glob(os.path.join(dump_dir, '*train_step*after_optimizations-live-range.txt')),
                 key=os.path.getsize)
  if not files:
    raise FileNotFoundError(f'no *train_step*live-range.txt under {dump_dir}')
  lr_file = files[-1]
  hlo_file = lr_file.replace('-live-range.txt', '.txt')
  peak = parse_peak(open(lr_file).read())
  instrs = parse_hlo(open(hlo_file).read()) if os.path.exists(hlo_file) else {}
  rows = []
  for v in peak['values']:
    info = instrs.get(v['instruction'], {})
    rows.append(dict(v, shape=info.get('shape', ''), opcode=info.get('opcode', ''),
                     op=_short_op(info.get('op_name', '')) or v['instruction']))
  rows.sort(key=lambda r: -r['size'])
  groups: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
  for r in rows:
    g = groups[_group_key(r['op'])]
    g[0] += r['size']
    g[1] += 1
  by_op = sorted(groups.items(), key=lambda kv: -kv[1][0])
  return dict(live_range=lr_file, peak_time=peak['time'], peak_instruction=peak.get('at', ''),
              peak_bytes=sum(r['size'] for r in rows), peak_values=len(rows),
              largest=rows[:top], by_op=[dict(op=k, bytes=b, count=n) for k, (b, n) in by_op[:top]])


def format_breakdown(r: Dict[str, Any]) -> str:
  lines = [f'live ranges: {r["live_range"]}']
  if r.get('memory'):
    lines.append('memory_analysis per device: ' + ', '.join(
        f'{k} {_fmt(v)}' for k, v in r['memory'].items() if k != 'generated_code'))
  lines.append(f'heap peak at step {r["peak_time"]} ({r["peak_instruction"]}): {r["peak_values"]} '
               f'values, {_fmt(r["peak_bytes"])} (parameters included)')
  lines.append('largest values live at the peak:')
  for row in r['largest']:
    lines.append(f'  {_fmt(row["size"]):>11}  {row["opcode"]:<12} {row["shape"][:44]:<44} '
                 f'{row["op"][-100:]}')
  lines.append('live at the peak, grouped by op (layer indices folded to N):')
  for row in r['by_op']:
    lines.append(f'  {_fmt(row["bytes"]):>11}  x{row["count"]:<5} {row["op"][-110:]}')
  return '\n'.join(lines)


def run(config, mesh_spec: Optional[Dict[str, int]], dump_dir: str, top: int) -> Dict[str, Any]:
  """Compiles the train step with the dump on; returns memory_analysis + the breakdown."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import flops  # pylint: disable=g-import-not-at-top
  s = flops.train_setup(config, mesh_spec)
  t0 = time.time()
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    compiled = jax.jit(s.step, **s.jit_kwargs).lower(s.abstract_state, s.batch).compile()
  seconds = time.time() - t0
  r = breakdown(dump_dir, top)
  r.update(memory=flops._memory(compiled), compile_seconds=seconds,  # pylint: disable=protected-access
           flops=float(flops._cost(compiled).get('flops', 0.0)),  # pylint: disable=protected-access
           devices=int(s.mesh.size), mesh=dict(s.mesh.shape),
           global_batch_size=config.data.global_batch_size)
  return r


def saved_residuals(config, clips: int, top: int = 25) -> Dict[str, Any]:
  """What autodiff keeps for the backward of the loss of `clips` clips, by the program, not a
  compiler: `jax.vjp` residuals of the loss w.r.t. the trainable parameters (traced, no compile).

  Activations (outputs of ops) are summed apart from residuals that are parameters or the batch,
  which live anyway. The same on every backend: what a compiler that keeps the program's remat
  (GPU, TPU) holds between forward and backward, before its own working set.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import flops  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import diffusion  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  config = type(config)(config.to_dict())
  config.data.global_batch_size = clips
  modules, init_params = flops._train_modules_and_init(config)  # pylint: disable=protected-access
  key = jax.random.key(0)
  params = nn.unbox(jax.eval_shape(functools.partial(init_params, modules, config), key))
  mask = train_lib.trainable_mask(params, config.train.trainable)
  schedule = diffusion.Schedule.from_config(config.diffusion)
  loss_fn = functools.partial(train_lib.LOSSES[config.train.objective], modules=modules,
                              schedule=schedule, config=config)
  f, r = config.data.num_frames, config.data.resolution
  length = config.model.text_encoder.max_position_embeddings
  batch = dict(video=jax.ShapeDtypeStruct((clips, f, r, r, 3), jnp.float32),
               input_ids=jax.ShapeDtypeStruct((clips, length), jnp.int32),
               fps=jax.ShapeDtypeStruct((clips,), jnp.float32),
               frame_mask=jax.ShapeDtypeStruct((clips, f), jnp.bool_))
  if config.data.get('precomputed_latents', False):
    vae = config.model.vae
    side = r // 2 ** (len(vae.block_out_channels) - 1)
    del batch['video']
    for k in ('latent_mean', 'latent_std'):
      batch[k] = jax.ShapeDtypeStruct((clips, f, side, side, vae.latent_channels), jnp.float32)
  found = []

  def trace(params, batch):
    trainable, frozen = train_lib.split_params(params, mask)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(clips))
    loss = lambda t: loss_fn(train_lib.merge_params(frozen, t), batch, keys)[0]
    found.extend(ad_checkpoint.saved_residuals(loss, trainable))
    return 0

  jax.eval_shape(trace, params, batch)
  groups: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
  total = 0
  for aval, src in found:
    if not src.startswith('output of'):
      continue  # Parameters, the batch, constants: live anyway.
    size = int(np.prod(aval.shape)) * aval.dtype.itemsize
    total += size
    where = re.sub(r'_\d+', '_N', src)
    g = groups[f'{aval.str_short(short_dtypes=True)} {where}'[:150]]
    g[0] += size
    g[1] += 1
  rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(clips=clips, activation_bytes=total, count=len(found),
              largest=[dict(what=k, bytes=b, count=n) for k, (b, n) in rows])


def remat_probe(layers: int = 16, rows: int = 8192, width: int = 512) -> Dict[str, Any]:
  """Does this backend's compiler keep `jax.checkpoint`? Gradient of a chain of residual MLP blocks
  with and without remat: compiled temporaries and dot count (recomputation adds 2 dots a block).

  A compiler that keeps remat needs about `layers` saved inputs (plus a working set) with it and
  ~3 activations a block without it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out = {}
  for remat in (False, True):
    def block(x, w):
      return jnp.tanh(jnp.tanh(x @ w) @ w.T) + x

    def loss(ws, x, remat=remat):
      for w in ws:
        x = (jax.checkpoint(block) if remat else block)(x, w)
      return jnp.sum(x ** 2)

    ws = [jax.ShapeDtypeStruct((width, width), jnp.float32)] * layers
    x = jax.ShapeDtypeStruct((rows, width), jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    out['remat' if remat else 'no_remat'] = dict(
        temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
        dots=compiled.as_text().count(' dot('))
  out['one_activation_bytes'] = rows * width * 4
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  from magicvideo_jax import flops  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if _DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  dump = os.environ['_MEMORY_BREAKDOWN_DUMP']
  if _PROBE.value:
    shutil.rmtree(dump, ignore_errors=True)
    r = remat_probe()
    print(f'{jax.default_backend()}: 16 residual MLP blocks, one activation '
          f'{_fmt(r["one_activation_bytes"])}; gradient temporaries without remat '
          f'{_fmt(r["no_remat"]["temp_bytes"])} ({r["no_remat"]["dots"]} dots), with jax.checkpoint '
          f'{_fmt(r["remat"]["temp_bytes"])} ({r["remat"]["dots"]} dots)')
    return
  if _RESIDUALS.value:
    shutil.rmtree(dump, ignore_errors=True)
    r = saved_residuals(_CONFIG.value, _RESIDUALS.value, _TOP.value)
    print(f'saved for the backward, {r["clips"]} clip(s): {_fmt(r["activation_bytes"])} of '
          f'activations ({r["count"]} residuals in all)')
    for row in r['largest']:
      print(f'  {_fmt(row["bytes"]):>11}  x{row["count"]:<4} {row["what"]}')
    return
  try:
    r = run(_CONFIG.value, flops.parse_mesh(_MESH.value), dump, _TOP.value)
  finally:
    if not _DUMP.value:
      shutil.rmtree(dump, ignore_errors=True)
  if _JSON.value:
    print(json.dumps(r, indent=1, default=str))
  else:
    print(f'{r["devices"]} device(s) {r["mesh"]}, global batch {r["global_batch_size"]}: compile '
          f'{r["compile_seconds"]:.1f} s, {r["flops"] / 1e12:.2f} TFLOP per device')
    print(format_breakdown(r))


def _with_dump_flags() -> None:
  """XLA reads XLA_FLAGS when the backend starts: set the dump flags before jax initialises."""
  dump = None
  for i, a in enumerate(sys.argv):
    if a.startswith('--dump_dir='):
      dump = a.split('=', 1)[1]
    elif a == '--dump_dir' and i + 1 < len(sys.argv):
      dump = sys.argv[i + 1]
  if not dump:  # Removed at exit: later compiles (e.g. jit_stage) write into it too.
    dump = tempfile.mkdtemp(prefix='memory_breakdown_')
    atexit.register(shutil.rmtree, dump, True)
  os.makedirs(dump, exist_ok=True)
  os.environ['_MEMORY_BREAKDOWN_DUMP'] = dump
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump} '
                             '--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*')


if __name__ == '__main__':
  _with_dump_flags()
  app.run(main)
