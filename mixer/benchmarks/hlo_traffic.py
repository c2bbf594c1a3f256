"""Memory traffic of a compiled step, read from its optimized HLO: what a memory-bound step costs.

On a GPU most of a Mixer train step outside the matmuls is memory-bound
(LayerNorm, bias + GELU, bias gradients, transposes): its time is about the
bytes its kernels read and write over the HBM bandwidth. Every top-level kernel
of the optimized HLO (a fusion, a gemm, a copy) reads its operands and writes
its result once, so summing operand + result bytes over the kernels that run,
with loop bodies counted once per trip (XLA's `known_trip_count`, or, in
libtpu's HLO, which has none, the bound of the loop's `counter < N`
condition), estimates the step's HBM traffic without running it. A scanned
loop reads its block's slice of stacked arrays (`dynamic-slice`) and writes
its slice in place (`dynamic-update-slice`, also inside a multi-output fusion):
only the slices count.

Each kernel gets a category (`category`: matmul, reduction, ..., collective),
from its name on XLA:GPU and from what it holds in libtpu's `fusion.N`. Each
collective also gets the bytes it sends per device over the interconnect, as a
ring all-reduce, all-gather or reduce-scatter does (`interconnect_gb`): with
the HBM bytes, what a sharding choice trades (docs/benchmarks.md, "Sharding a
pod run").

The estimate ranks variants the way the H100 did: for the B/16 train step at
batch 256, five variants measured there from 141.8 GB (65.2 ms) to 323.7 GB
(120 ms, scanned without remat) lie within 3.3 ms of one line whose slope is
about the H100's HBM bandwidth (docs/benchmarks.md).
It needs only a compiled step, so a change can be judged on a machine without
the GPU, from an HLO compiled for it (docs/benchmarks.md shows how to compile
for an H100 without one) or from the local backend's:

  python -m mixer.benchmarks.hlo_traffic --hlo=step.hlo.txt[.gz] --top=15

`compile_bench` records it (`traffic_gb_per_device`) for every step it compiles.
Hand-written because XLA's `cost_analysis()` of a step compiled for a GPU
without one is empty.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import os
import re
import sys

from absl import logging

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2,
          's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8,
          'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY )?%(\S+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$')
_NAME = re.compile(r'%([\w.\-]+)')
# Instructions that move no data of their own.
_FREE = frozenset({'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast',
                   'after-all', 'partition-id', 'replica-id', 'opt-barrier'})
CATEGORIES = ('matmul', 'reduction', 'elementwise', 'copy/layout', 'slicing', 'collective',
              'other')
# With their async `-start` forms; a `-done` only waits for its start (`kernels` skips it).
_COLLECTIVES = frozenset(
    name + suffix for name in ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                               'collective-permute', 'collective-broadcast')
    for suffix in ('', '-start'))
_MATMULS = frozenset({'dot', 'convolution'})
_SLICES = frozenset({'dynamic-slice', 'dynamic-update-slice'})
_REDUCTIONS = frozenset({'reduce', 'reduce-window'})
_LAYOUT = frozenset({'copy', 'transpose', 'reshape'})
_ELEMENTWISE = frozenset({
    'abs', 'add', 'and', 'broadcast', 'cbrt', 'ceil', 'clamp', 'compare', 'convert', 'cosine',
    'divide', 'exponential', 'exponential-minus-one', 'floor', 'iota', 'log', 'log-plus-one',
    'logistic', 'maximum', 'minimum', 'multiply', 'negate', 'not', 'or', 'power', 'remainder',
    'round-nearest-even', 'rsqrt', 'select', 'sign', 'sine', 'sqrt', 'subtract', 'tanh', 'xor'})


def category(name: str, opcode: str, fused: frozenset[str] = frozenset(),
             target: str = '') -> str:
  """What a kernel is, from its name, its opcode, the opcodes `fused` inside it (nested too)
  and a custom call's `target`.

  XLA:GPU names a fusion after its hero (`gemm_fusion_dot`, `input_reduce_fusion`,
  `loop_transpose_fusion`); libtpu names most `fusion.N` and fuses each matmul (a
  `convolution`) with its neighbours, e.g. into `multiply_reduce_fusion`. So a fusion
  holding a matmul is a matmul, and one named `fusion.N` (libtpu's, and XLA:GPU's
  multi-output fusions) is what it holds.
  A collective (`all-reduce` names hold 'reduce'; libtpu's reduce-scatter is a
  `fusion.N` around an all-reduce) is ICI traffic as well as HBM traffic.
  XLA:GPU runs the gemms its autotuner gives to cuBLAS as custom calls
  (`custom-call.5`, target `__cublas$lt$matmul` or `__cublas$gemm`), and cuDNN's
  convolutions likewise (`__cudnn$convForward`): matmuls too.
  """
  if ('gemm' in name or 'dot' in name or opcode in _MATMULS or fused & _MATMULS
      or re.match(r'__(cublas|cudnn\$conv)', target)):
    return 'matmul'
  if opcode in _COLLECTIVES or fused & _COLLECTIVES:
    return 'collective'
  if 'dynamic_update_slice' in name or 'dynamic_slice' in name or opcode in _SLICES:
    return 'slicing'
  if 'reduce' in name or opcode in _REDUCTIONS:
    return 'reduction'
  if 'transpose' in name or 'copy' in name or opcode in _LAYOUT:
    return 'copy/layout'
  if opcode == 'fusion' or 'fusion' in name:
    if not re.fullmatch(r'fusion(\.[\w.]*)?', name):
      return 'elementwise'  # Named after an elementwise hero, e.g. `loop_convert_fusion`.
    for held, kind in ((_SLICES, 'slicing'), (_REDUCTIONS, 'reduction'),
                       (_LAYOUT - {'reshape'}, 'copy/layout')):
      if fused & held:
        return kind
    return 'elementwise'
  return 'elementwise' if opcode in _ELEMENTWISE else 'other'


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One top-level instruction that runs: its bytes per step (all loop trips), what it is."""
  name: str
  opcode: str
  source: str      # The jax op it came from (HLO metadata op_name), '' if none.
  bytes: int
  trips: int       # How often it runs per step (1 outside loops).
  category: str    # One of CATEGORIES (`category`).
  ici_bytes: int = 0  # What a collective sends per device over the interconnect (`_ici_bytes`).


def array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string (tuples summed), e.g. 'bf16[2,3]{1,0}' -> 12."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    total += count * _BYTES[dtype]
  return total


def _computations(hlo: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """{computation: [(name, shape, opcode, rest of line)]}; the entry one is 'ENTRY'."""
  computations, current = {}, None
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault('ENTRY' if header.group(1) else header.group(2), [])
    elif line.startswith('}'):
      current = None
    elif current is not None:
      instruction = _INSTRUCTION.match(line)
      if instruction:
        current.append(instruction.groups())
  return computations


def _operand_names(rest: str) -> list[str]:
  """The operands of an instruction, from the text after its opcode's '('."""
  return _NAME.findall(rest.split('), ', 1)[0])


def _fusion_access(computation: str, computations, memo: dict) -> tuple[dict, dict, int]:
  """What a fused computation really touches of its operands and its result.

  Returns (read, in_place, aliased):
  - read: {parameter index: bytes read} for parameters used only through slices
    (a loop body reading its block's slice of a stacked array): by a
    `dynamic-slice`, or by a nested fusion that itself only slices them (libtpu
    nests them);
  - in_place: {parameter index: bytes written} for parameters that are the
    buffer of a `dynamic-update-slice` that is the root or an element of a
    tuple root (a multi-output fusion, as libtpu fuses a matmul with the write
    of its output into a stack): the buffer is aliased, only the update moves;
  - aliased: the bytes of those result elements, which are not written whole.
  A `bitcast` of a parameter (e.g. a stack read in another layout) is the
  parameter itself: it moves no bytes.
  """
  if computation in memo:
    return memo[computation]
  body = computations.get(computation, [])
  parameters, parameter_of, shapes, produced_by = {}, {}, {}, {}
  uses = collections.defaultdict(list)  # operand -> [bytes read if a slice use, else None]
  for name, shape, opcode, rest in body:
    shapes[name] = shape
    if opcode == 'parameter':
      parameters[name] = int(re.match(r'(\d+)\)', rest).group(1))
      parameter_of[name] = name
      continue
    operands = [parameter_of.get(o, o) for o in _operand_names(rest)]
    produced_by[name] = (opcode, operands)
    if opcode == 'bitcast' and operands[0] in parameters:
      parameter_of[name] = operands[0]
      continue
    nested = re.search(r'calls=%([\w.\-]+)', rest) if opcode == 'fusion' else None
    nested_read = _fusion_access(nested.group(1), computations, memo)[0] if nested else {}
    for position, operand in enumerate(operands):
      if opcode == 'dynamic-slice' and position == 0:
        uses[operand].append(array_bytes(shape))
      else:
        uses[operand].append(nested_read.get(position))
  read = {index: sum(uses[name]) for name, index in parameters.items()
          if uses[name] and all(b is not None for b in uses[name])}
  in_place, aliased = {}, 0
  if body:
    root, _, root_opcode, _ = body[-1]
    elements = produced_by[root][1] if root_opcode == 'tuple' else [root]
    for element in elements:
      opcode, operands = produced_by.get(element, ('', []))
      buffer = parameter_of.get(operands[0]) if opcode == 'dynamic-update-slice' else None
      if buffer is not None:
        in_place[parameters[buffer]] = array_bytes(shapes[operands[1]])
        aliased += array_bytes(shapes[element])
  memo[computation] = read, in_place, aliased
  return memo[computation]


def _group_size(rest: str, devices: int) -> int:
  """How many devices one of a collective's groups holds, from its `replica_groups`:
  explicit ({{0,1,..},..}), iota ([groups,size]<=[n]) or libtpu's mesh form
  (mesh['axis_0'=16,'axis_1'=16] {'axis_0'}); `devices` where it names none."""
  explicit = re.search(r'replica_groups=\{\{([\d,]*)\}', rest)
  if explicit:
    return len(explicit.group(1).split(','))
  iota = re.search(r'replica_groups=\[\d+,(\d+)\]<=', rest)
  if iota:
    return int(iota.group(1))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    size = 1
    for axis in re.findall(r"'(\w+)'", mesh.group(2)):
      size *= int(sizes.get(axis, 1))
    return size
  return devices


def _ici_bytes(opcode: str, rest: str, operands: list[int], result: int, result_is_tuple: bool,
               held: list[tuple[str, int, str]], devices: int) -> int:
  """Bytes one device sends over the interconnect for a collective, as a ring does it: an
  all-reduce of S bytes over n devices sends 2(n-1)/n S, an all-gather to S or a
  reduce-scatter of S (n-1)/n S. A fusion holding a collective (`held`: [(opcode, result
  bytes, rest of line)] of those it holds, nested ones too; libtpu's reduce-scatter is an
  all-reduce whose result it slices) counts as the collective it holds. A torus spreads
  the same bytes over more links; this is the volume, not the time."""
  if opcode == 'fusion':
    if not held:
      return 0
    opcode, size, rest = held[0]
    if opcode.startswith('all-reduce') and result < size:
      opcode = 'reduce-scatter'  # The slice of the reduced whole that this device keeps.
    operands, result, result_is_tuple = [size], size, False
  if opcode not in _COLLECTIVES:
    return 0
  n = _group_size(rest, devices)
  share = (n - 1) / n
  kind = opcode.removesuffix('-start')
  if opcode == 'all-gather-start' and result_is_tuple:
    result -= sum(operands)  # Its result is (operand, gathered).
  if kind == 'all-reduce':
    return round(2 * share * result)
  if kind == 'all-gather':
    return round(share * result)
  if kind in ('reduce-scatter', 'all-to-all'):
    return round(share * sum(operands))
  return sum(operands)  # collective-permute, collective-broadcast: each sends its operand.


def _fused_instructions(computation: str, computations, memo: dict) -> list:
  """The instructions (name, shape, opcode, rest of line) of a fused computation, with those
  of the fusions nested in it: what `category` and `_ici_bytes` look at."""
  if computation not in memo:
    found = []
    for instruction in computations.get(computation, []):
      found.append(instruction)
      _, _, opcode, rest = instruction
      nested = re.search(r'calls=%([\w.\-]+)', rest) if opcode == 'fusion' else None
      if nested:
        found += _fused_instructions(nested.group(1), computations, memo)
    memo[computation] = found
  return memo[computation]


def _trip_count(name: str, rest: str, computations) -> int:
  """How often a `while` runs: XLA's `known_trip_count` (GPU and CPU record it), else the
  bound of its condition `counter < constant`, the form a lowered `scan` takes (libtpu's
  optimized HLO keeps no count). A loop of neither form is counted once, with a warning."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
  if known:
    return int(known.group(1))
  condition = re.search(r'condition=%([\w.\-]+)', rest)
  body = computations.get(condition.group(1), []) if condition else []
  constants = {}
  for constant, _, opcode, text in body:
    value = re.match(r'(\d+)\)', text)
    if opcode == 'constant' and value:
      constants[constant] = int(value.group(1))
  if body and body[-1][2] == 'compare' and 'direction=LT' in body[-1][3]:
    bound = _operand_names(body[-1][3])[-1]
    if bound in constants:
      return constants[bound]
  logging.warning('hlo_traffic: loop %s has no known trip count; its body is counted once.',
                  name)
  return 1


def kernels(hlo: str) -> list[Kernel]:
  """The kernels of an optimized HLO module (`compiled.as_text()`) that run, with their bytes."""
  computations = _computations(hlo)
  if 'ENTRY' not in computations:
    raise ValueError('No ENTRY computation: pass the text of an HLO module (compiled.as_text()).')
  found, memo, fused_memo = [], {}, {}
  partitions = re.search(r'num_partitions=(\d+)', hlo[:100_000])
  devices = int(partitions.group(1)) if partitions else 1

  def walk(computation: str, trips: int):
    shapes = {}
    for name, shape, opcode, rest in computations[computation]:
      shapes[name] = shape
      if opcode in _FREE or opcode.endswith('-done'):  # A `*-done` waits for its `*-start`.
        continue
      if opcode == 'while':
        walk(re.search(r'body=%([\w.\-]+)', rest).group(1),
             trips * _trip_count(name, rest, computations))
        continue
      if opcode in ('call', 'conditional', 'async-start'):
        for called in _NAME.findall(rest.split('), ', 1)[-1]):
          if called in computations:
            walk(called, trips)
        continue
      operands = [array_bytes(shapes[o]) for o in _operand_names(rest) if o in shapes]
      result = array_bytes(shape)
      target = re.search(r'custom_call_target="([^"]*)"', rest) if opcode == 'custom-call' else None
      target = target.group(1) if target else ''
      if target.startswith('__cublas') and shape.startswith('('):
        # (output, s8[...] workspace): the workspace is cuBLAS's scratch, not data it writes.
        result = array_bytes(_ARRAY.search(shape).group(0))
      fused = re.search(r'calls=%([\w.\-]+)', rest)
      fused_computation = fused.group(1) if fused else None
      read, in_place, aliased = (_fusion_access(fused_computation, computations, memo)
                                 if fused_computation else ({}, {}, 0))
      if opcode == 'dynamic-slice':
        read = {0: result}
      if opcode == 'dynamic-update-slice':
        in_place, aliased = {0: operands[1]}, result
      # Operands read (their slices where only sliced), the result written, except in-place
      # buffers (aliased with the result), of which only the update is written.
      moved = (sum(read.get(i, b) for i, b in enumerate(operands) if i not in in_place)
               + result - aliased + sum(in_place.values()))
      source = re.search(r'op_name="([^"]*)"', rest)
      held = (_fused_instructions(fused_computation, computations, fused_memo)
              if fused_computation else [])
      kind = category(name, opcode, frozenset(op for _, _, op, _ in held), target)
      ici = (_ici_bytes(opcode, rest, operands, result, shape.startswith('('),
                        [(op, array_bytes(out), text) for _, out, op, text in held
                         if op in _COLLECTIVES], devices)
             if kind == 'collective' else 0)
      found.append(Kernel(name, opcode, source.group(1) if source else '', moved * trips, trips,
                          kind, ici * trips))

  walk('ENTRY', 1)
  return found


def step_summary(compiled) -> dict:
  """`summary` of a compiled step (`jax.stages.Compiled`): what compile benchmarks report."""
  return summary(kernels(compiled.as_text()))


def summary(found: list[Kernel]) -> dict:
  """Total bytes per step and per category, and what the collectives send, in GB per device."""
  by_category = collections.Counter()
  for kernel in found:
    by_category[kernel.category] += kernel.bytes
  # To the kB: a small test model's step moves well under a MB.
  return {'traffic_gb': round(sum(by_category.values()) / 1e9, 6),
          'traffic_gb_by_category': {c: round(by_category[c] / 1e9, 6)
                                     for c in CATEGORIES if by_category[c]},
          # Bytes each device's collectives send over the interconnect (ICI on a TPU slice).
          'interconnect_gb': round(sum(k.ici_bytes for k in found) / 1e9, 6)}


def readable_source(op_name: str) -> str:
  """A kernel's jax op for people: 'backward MixerBlock_*/channel_mixing/Dense_0/mul'.

  From HLO's op_name ('jit(train_step)/transpose(jvp(MlpMixer))/MlpMixer._blocks/
  MixerBlock_3/...'): the pass, then the module path with block indices merged.
  The pass is `forward`, `backward`, `recompute` (remat's forward pass again,
  inside the backward one) or `update` (after the gradients: clipping, the
  optimizer, the train metrics). The scan's own levels (`while/body`,
  `closed_call`, the remat `checkpoint` around the blocks, `MixerBlocks`) are
  dropped, so scanned and unrolled steps read alike; a path that a nested
  transformation (jax.checkpoint) repeats is written once.
  """
  if not op_name:
    return ''
  # An op XLA made of several (e.g. all-reduces combined into one) names them all:
  # 'jit(train_step)/(a/reduce_sum:b/dot_general:...)'. Name the first and count the rest.
  combined = re.fullmatch(r'(jit\([^)]*\)/)\((.*:.*)\)', op_name)
  if combined:
    parts = combined.group(2).split(':')
    return (f'{readable_source(combined.group(1) + parts[0])} '
            f'(and {len(parts) - 1} more ops, combined)')
  path = re.sub(r'^jit\([^)]*\)/', '', op_name)
  direction = ('backward' if path.startswith('transpose(') else
               'forward' if path.startswith('jvp(') else 'update')
  path = re.sub(r'(transpose\()?jvp\([^)]*\)\)?/', '', path)
  if 'rematted_computation/' in path:
    direction = 'recompute'
  path = re.sub(r'while/body/|closed_call/?|checkpoint/(?=rematted_computation/|MixerBlocks/)|'
                r'rematted_computation/|MixerBlocks/', '', path)
  path = re.sub(r'MlpMixer\._blocks/?', '', re.sub(r'MixerBlock_\d+', 'MixerBlock_*', path))
  parts = path.split('/')
  for size in range(len(parts) // 2, 0, -1):
    if parts[:size] == parts[size:2 * size]:
      parts = parts[size:]
      break
  return f'{direction} {"/".join(parts) or "blocks (scan loop)"}'


def by_source(found: list[Kernel], top: int) -> list[tuple[float, int, str]]:
  """The largest non-matmul traffic per jax op (block indices merged): [(GB, kernels, op)]."""
  totals, counts = collections.Counter(), collections.Counter()
  for kernel in found:
    if kernel.category == 'matmul':
      continue
    source = readable_source(kernel.source) or kernel.name
    totals[source] += kernel.bytes
    counts[source] += kernel.trips
  return [(round(b / 1e9, 2), counts[s], s) for s, b in totals.most_common(top)]


def report(hlo: str, top: int, bandwidth: float) -> str:
  """The total and per-category traffic, then the `top` jax ops by non-matmul traffic."""
  found = kernels(hlo)
  totals = summary(found)
  gb = totals['traffic_gb']
  lines = [f'{gb:.1f} GB per step ({gb / bandwidth * 1e3:.1f} ms at {bandwidth:g} GB/s), '
           f'{sum(k.trips for k in found)} kernels: ' + ', '.join(
               f'{c} {v:.1f}' for c, v in totals['traffic_gb_by_category'].items())]
  if totals['interconnect_gb']:
    lines.append(f'collectives send {totals["interconnect_gb"]:.2f} GB per device over the '
                 'interconnect (ring volume)')
  lines += [f'{"GB":>8}  {"kernels":>7}  largest non-matmul traffic, by jax op']
  lines += [f'{gb:8.2f}  {count:7d}  {source}' for gb, count, source in by_source(found, top)]
  return '\n'.join(lines)


def main(argv, hlo: str, top: int, bandwidth: float) -> int:
  """Prints `report` of the HLO text file `hlo` (gzipped if it ends in .gz); 2 if unreadable."""
  del argv
  try:
    opener = gzip.open if hlo.endswith('.gz') else open
    with opener(hlo, 'rt') as f:
      text = f.read()
    lines = report(text, top, bandwidth)
  except (OSError, ValueError) as error:
    print(f'error: cannot read HLO from {hlo}: {error}. Pass the text of a compiled '
          'step: open(path, "w").write(compiled.as_text()).', file=sys.stderr)
    return 2
  try:
    print(lines, flush=True)
  except BrokenPipeError:  # Piped into `head`, which has read enough: not an error.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  _HLO = flags.DEFINE_string('hlo', None, 'Optimized HLO text (compiled.as_text()), .gz too.',
                             required=True)
  _TOP = flags.DEFINE_integer('top', 15, 'How many jax ops to list.', lower_bound=1)
  _BANDWIDTH = flags.DEFINE_float('bandwidth', 3350, 'GB/s to convert bytes to time '
                                  '(3,350: an H100 SXM data sheet).')
  app.run(lambda argv: sys.exit(main(argv, _HLO.value, _TOP.value, _BANDWIDTH.value)))
