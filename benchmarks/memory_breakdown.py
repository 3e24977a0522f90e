r"""Where the compiled train step's memory goes: the largest buffers live at the peak, by op.

Compiles the train step `magicvideo_jax.flops.train_setup` builds (abstract inputs, nothing runs) with
XLA's buffer-assignment dump on, then reads the dump: `compiled.memory_analysis()` totals, the
values live at the heap peak (the dump's live ranges), each with its HLO instruction, shape and
the JAX op name from the HLO metadata, and the same grouped by op with layer indices folded (so that
e.g. the softmax of every spatial attention shows as one line).

  python -m benchmarks.memory_breakdown --config=configs/sd15_256.py --num_cpu_devices 1 \
      --mesh data=1,fsdp=1 --config.data.global_batch_size=1 [--top 30] [--json]

Only the memory of one program: XLA:CPU's buffer assignment (what this machine can compile), which
upcasts bf16 dots/convolutions to f32 and schedules differently from GPU/TPU.
"""

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


def main(argv: Sequence[str]) -> None:
  del argv
  from magicvideo_jax import flops  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if _DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  dump = os.environ['_MEMORY_BREAKDOWN_DUMP']
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
  dump = dump or tempfile.mkdtemp(prefix='memory_breakdown_')
  os.makedirs(dump, exist_ok=True)
  os.environ['_MEMORY_BREAKDOWN_DUMP'] = dump
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump} '
                             '--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*')


if __name__ == '__main__':
  _with_dump_flags()
  app.run(main)
