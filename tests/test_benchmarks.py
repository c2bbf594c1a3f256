"""The benchmark suite, the 'synthetic' source and the persistent compilation cache.

Fast tests check what each benchmark computes (FLOP counts against XLA's own,
per-device bytes under FSDP, the table); the end-to-end runs are `slow`.
"""

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mixer import compile_cache, input_pipeline, models, trainer_setup
from mixer.benchmarks import ablation, compile_bench, hlo_traffic, model_bench, profile_bench
from mixer.benchmarks import run as bench_run
from mixer.datasets import get_source
from tests import multidevice


def test_forward_flops_match_xla_count():
  """The analytic matmul count is XLA's FLOP count of the forward pass, minus elementwise ops."""
  model = models.MlpMixer(num_classes=10, patch_size=4, hidden_dim=64, num_blocks=2,
                          tokens_mlp_dim=64, channels_mlp_dim=256)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  compiled = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(
      models.unbox(params), images).compile()
  xla = model_bench._xla_flops(compiled)
  analytic = 2 * model_bench.forward_flops(model, 32)
  # Matmuls are ~95% of this model's FLOPs; XLA also counts GELU/LayerNorm/adds.
  assert 0.85 < analytic / xla <= 1.0


def test_peak_on_cpu_is_a_timed_matmul():
  peak = model_bench.peak_flops_per_device('float32', size=256, repeats=2)
  assert peak['flops'] > 1e8 and 'matmul timed' in peak['source']
  # Per CPU-second of this process: at least the wall rate of one busy core's share.
  assert peak['flops_per_cpu_second'] > 1e8


def test_fsdp_bytes_per_device_are_split():
  out = multidevice.run_with_devices("""
      import json
      from mixer.benchmarks import compile_bench, model_bench
      from mixer import trainer_setup
      result = {}
      for fsdp in (1, 4):
        config = model_bench.bench_config('Mixer-S_32', 8, 64, fsdp=fsdp)
        config.mesh.data = -1
        setup = trainer_setup.build(config)
        result[fsdp] = [compile_bench._bytes_per_device(setup.abstract_state[k])
                        for k in ('params', 'opt_state')]
      print(json.dumps(result))
      """, num_devices=4)
  (params1, opt1), (params4, opt4) = out['1'], out['4']
  assert opt4 == pytest.approx(2 * params4, abs=64)
  assert opt1 == pytest.approx(2 * params1, abs=64)  # Adam: mu and nu (+ step counts).
  # Everything with a hidden (embed) axis is split 4 ways; the token-mixing weights are not.
  assert params1 / 4 < params4 < params1 / 3.5


def test_table_has_a_block_per_benchmark_with_values():
  records = [
      {'benchmark': 'train', 'model': 'Mixer-S_32', 'image_size': 224, 'batch_size': 8,
       'dtype': 'float32', 'scan_blocks': False, 'remat': 'none', 'residual_dtype': 'float32',
       'device_kind': 'cpu', 'img_per_sec_per_device': 3.08, 'step_seconds': 2.5934,
       'model_gflops_per_image': 6.015, 'mfu': 0.5472, 'memory_bytes_per_device': 478233064},
      {'benchmark': 'cache', 'model': 'Mixer-S_32', 'device_kind': 'cpu',
       'first_start_compile_cpu_seconds': 10.0, 'second_start_compile_cpu_seconds': 1.0,
       'second_over_first': 0.1, 'target_second_over_first': 0.2},
      {'benchmark': 'input', 'cores': 2, 'images_per_sec_per_core': 380.0},
  ]
  table = bench_run.format_table(records)
  assert '== train (cpu) ==' in table and '== cache (cpu) ==' in table
  assert '== input (2 CPU cores) ==' in table
  # A record that names no device gets a plain heading, not '(None CPU cores)'.
  assert bench_run.format_table([dict(records[1], device_kind=None)]).startswith('== cache ==\n')
  train_lines = next(b for b in table.split('\n\n') if b.startswith('== train')).splitlines()
  assert train_lines[1].split()[:3] == ['model', 'res', 'batch']
  assert train_lines[3].split() == ['Mixer-S_32', '224', '8', 'float32', 'False', 'none', '3.08',
                                    '2593.4', '6.01', '0.547', '-', '-', '456']
  # The residual dtype gets a column only where a row is not the default float32.
  both = bench_run.format_table([records[0], dict(records[0], residual_dtype='bfloat16')])
  assert [line.split()[6] for line in both.splitlines()[1:] if line.strip('- ')] == [
      'residual', 'float32', 'bfloat16']


def test_bench_config_carries_the_residual_dtype_to_the_model_and_the_record():
  config = model_bench.bench_config('Mixer-S_32', 2, 64, residual_dtype='bfloat16')
  assert trainer_setup.build(config).model.residual_dtype == 'bfloat16'
  assert model_bench.config_fields(config)['residual_dtype'] == 'bfloat16'
  assert model_bench.config_fields(model_bench.bench_config())['residual_dtype'] == 'float32'


def test_ablation_names_parse_and_bad_ones_are_refused():
  assert ablation.parse('none') == ()
  assert ablation.parse('gelu+layernorm') == ('gelu', 'layernorm')
  assert ablation.label(ablation.parse('transpose+gelu')) == 'transpose+gelu'
  assert ablation.label(()) == 'none'
  for bad in ('softmax', 'gelu+gelu', 'gelu+none', ''):
    with pytest.raises(ValueError, match='--ablate takes none or names from'):
      ablation.parse(bad)


def _train_step_hlo(names=()):
  config = model_bench.bench_config('Mixer-S_32', 2, 64, num_blocks=1)
  with ablation.ablated(names):
    return trainer_setup.compile_train_step(trainer_setup.build(config)).as_text()


def test_each_ablation_takes_its_op_out_of_the_compiled_step_and_only_that_op():
  originals = {a: getattr(models, a) for changes in ablation.ABLATIONS.values() for a in changes}
  base = _train_step_hlo()

  def counts(text):  # GELU's tanh, LayerNorm's rsqrt, the token-mixing swaps' transposes.
    return {'tanh': text.count(' tanh('), 'rsqrt': text.count(' rsqrt('),
            'transpose': text.count(' transpose(')}

  before = counts(base)
  assert before['tanh'] > 0 and before['rsqrt'] > 0 and before['transpose'] > 0
  gelu, layernorm, transpose = (counts(_train_step_hlo((name,)))
                                for name in ('gelu', 'layernorm', 'transpose'))
  assert gelu['tanh'] == 0 and gelu['rsqrt'] == before['rsqrt']
  assert layernorm['rsqrt'] == 0 and layernorm['tanh'] == before['tanh']
  assert transpose['transpose'] < before['transpose']
  assert (transpose['tanh'], transpose['rsqrt']) == (before['tanh'], before['rsqrt'])
  # Left as it was afterwards, also when the code inside raises.
  with pytest.raises(RuntimeError):
    with ablation.ablated(tuple(ablation.ABLATIONS)):
      assert models.layer_norm is not originals['layer_norm']
      raise RuntimeError
  assert {a: getattr(models, a) for a in originals} == originals
  assert counts(_train_step_hlo()) == before


def test_run_cli_ablates_the_train_step_and_refuses_unknown_ablations(tmp_path):
  out = tmp_path / 'results.jsonl'

  def bench(*flags, timeout=120):
    return subprocess.run([sys.executable, '-m', 'mixer.benchmarks.run', *flags],
                          env=multidevice.subprocess_env(1), capture_output=True, text=True,
                          cwd=multidevice.REPO, timeout=timeout, check=False)

  train = ['--benchmarks=train', '--models=Mixer-S_32', '--image_sizes=64', '--batch_sizes=4',
           '--steps=1', '--repeats=1', f'--out={out}']
  done = bench(*train, '--ablate=none,gelu+layernorm+transpose', timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['ablate'] for r in records] == ['none', 'gelu+layernorm+transpose']
  # Without LayerNorm and GELU the step keeps fewer activations for the backward pass.
  assert records[1]['memory_bytes_per_device'] < records[0]['memory_bytes_per_device']
  header = next(line for line in done.stdout.splitlines() if line.lstrip().startswith('model'))
  assert 'ablated' in header.split()
  assert 'gelu+layernorm+transpose' in done.stdout
  refused = bench(*train, '--ablate=none,softmax')
  assert refused.returncode == 2
  assert refused.stderr.splitlines()[-1].startswith('error: --ablate takes none or names from')
  assert "got 'softmax'" in refused.stderr
  unused = bench('--benchmarks=compile', '--ablate=gelu')
  assert unused.returncode == 2 and unused.stderr.splitlines()[-1] == (
      'error: --ablate applies to forward, train and profile only; add one of them to '
      '--benchmarks or drop --ablate.')


def test_synthetic_source_train_batches_and_eval_reads():
  source = get_source('synthetic', num_classes=7)
  assert source.num_classes == 7 and source.num_examples('test') == 512
  assert source.num_examples('train', process_index=1, process_count=2) == 25_000
  from mixer import config_lib
  config = config_lib.base_config()
  config.update(dataset='synthetic', num_classes=7, image_size=16, batch_size=6)
  batches = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  first, second = next(batches), next(batches)
  assert first['image'].shape == (6, 16, 16, 3) and first['image'].dtype == np.float32
  assert first['image'] is second['image']  # One constant host batch: no per-step work.
  assert -1 <= first['image'].min() < first['image'].max() <= 1
  np.testing.assert_array_equal(first['labels'].argmax(-1), [0, 1, 2, 3, 4, 5])
  data = input_pipeline.create_eval_iterator(config, split='test[:10]', batch_size=4)
  batch = next(iter(data))
  assert batch['image'].shape == (4, 16, 16, 3) and batch['mask'].all()
  get_source('synthetic').check_split('train')  # The trainer's early check: no class count.
  with pytest.raises(ValueError, match='num_classes'):
    get_source('synthetic', num_classes=None).read('test')


def test_persistent_cache_second_process_loads_instead_of_compiling(tmp_path):
  code = textwrap.dedent(f"""
      import json, jax, jax.numpy as jnp
      from mixer import compile_cache
      compile_cache.enable({str(tmp_path)!r}, min_compile_time_secs=0)
      events = []
      jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
      jax.jit(lambda x: jnp.sin(x) @ x.T + 1)(jnp.ones((64, 64))).block_until_ready()
      print(json.dumps({{'hits': events.count('/jax/compilation_cache/cache_hits')}}))
      """)
  env = multidevice.subprocess_env(1)

  def start():
    done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          cwd=multidevice.REPO, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])['hits']

  assert start() == 0
  assert os.listdir(tmp_path)  # The first start wrote its executables.
  assert start() >= 1


def test_a_cache_entry_cut_short_is_compiled_again_and_replaced(tmp_path):
  """A kill (or a full disk) during JAX's write left a truncated entry, which JAX then could
  not read at any later start and never rewrote: every start warned and compiled again."""
  code = textwrap.dedent(f"""
      import json, warnings, jax, jax.numpy as jnp
      from mixer import compile_cache
      compile_cache.enable({str(tmp_path)!r}, min_compile_time_secs=0)
      events = []
      jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        jax.jit(lambda x: jnp.sin(x) @ x.T + 1)(jnp.ones((64, 64))).block_until_ready()
      print(json.dumps({{'hits': events.count('/jax/compilation_cache/cache_hits'),
                         'warnings': [str(w.message) for w in caught]}}))
      """)
  env = multidevice.subprocess_env(1)

  def start():
    done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          cwd=multidevice.REPO, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])

  assert start()['hits'] == 0
  [entry] = [p for p in tmp_path.iterdir() if p.name.startswith('jit__lambda')]
  whole = entry.read_bytes()
  cut_short = whole[:len(whole) // 2]
  entry.write_bytes(cut_short)  # What a kill in the middle of the write leaves.
  healed = start()
  assert any('Error reading persistent compilation cache' in w for w in healed['warnings'])
  # Compiled again and written over the broken entry (not byte-equal to the first write: an
  # entry also holds its compile time), which the next start loads without a warning.
  assert entry.read_bytes() != cut_short and len(entry.read_bytes()) > len(cut_short)
  again = start()
  assert again['hits'] >= 1 and not again['warnings']
  assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_a_failed_cache_write_leaves_the_old_entry_and_no_partial_file(tmp_path, monkeypatch):
  from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  entries = compile_cache._ReplaceableEntries(lru_cache.LRUCache(str(tmp_path), max_size=-1))
  entries.put('k', b'old entry')
  assert entries.get('k') == b'old entry'

  def disk_full(fd):  # The bytes are in the temporary file; making them durable fails.
    del fd
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', disk_full)
  with pytest.raises(OSError):
    entries.put('k', b'new entry')
  monkeypatch.undo()
  assert entries.get('k') == b'old entry'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['k-cache']


def test_partial_cache_entries_of_killed_writers_are_removed_once_stale(tmp_path):
  # paths.atomic_write's temporary names: .<entry>.<random>.tmp
  stale = tmp_path / '.jit_f-k1-cache.ab12.tmp'
  fresh = tmp_path / '.jit_f-k2-cache.cd34.tmp'
  entry = tmp_path / 'jit_f-k3-cache'
  for path in (stale, fresh, entry):
    path.write_bytes(b'x')
  old = os.path.getmtime(stale) - compile_cache.STALE_PARTIAL_SECS - 1
  os.utime(stale, (old, old))
  os.utime(entry, (old, old))
  compile_cache._remove_stale_partials(str(tmp_path))
  # A fresh one may be another run's write in progress; entries are never touched.
  assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, entry.name]


@pytest.mark.slow
def test_cache_benchmark_second_start_loads_and_splits_tracing_from_xla():
  record = compile_bench.persistent_cache(
      dict(model='Mixer-S_32', image_size=64, batch_size=4))
  assert not record['first_start_from_cache'] and record['second_start_from_cache']
  assert record['cache_entries'] >= 1
  for start in ('first', 'second'):
    parts = (record[f'{start}_start_tracing_cpu_seconds'], record[f'{start}_start_xla_cpu_seconds'])
    assert min(parts) > 0
    # The two parts are the whole (each figure is rounded to 0.01 s on its own).
    assert sum(parts) == pytest.approx(record[f'{start}_start_compile_cpu_seconds'], abs=0.02)
  # Loading the executable is cheaper than compiling it; the cache does not spare the tracing.
  assert record['second_start_xla_cpu_seconds'] < record['first_start_xla_cpu_seconds']
  assert record['second_over_first'] == pytest.approx(
      record['second_start_compile_cpu_seconds'] / record['first_start_compile_cpu_seconds'],
      abs=0.01)


@pytest.mark.slow
def test_run_cli_writes_json_lines_and_a_table(tmp_path):
  out = tmp_path / 'results.jsonl'
  done = subprocess.run(
      [sys.executable, '-m', 'mixer.benchmarks.run',
       '--benchmarks=forward,train,compile,e2e,profile', '--models=Mixer-S_32',
       '--image_sizes=64', '--batch_sizes=4', '--devices=1,2', '--steps=1', '--repeats=1',
       '--e2e_steps=8', '--profile_steps=2', f'--profile_dir={tmp_path / "profile"}',
       f'--out={out}'],
      env=multidevice.subprocess_env(1), capture_output=True, text=True, cwd=multidevice.REPO,
      timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  kinds = [r['benchmark'] for r in records]
  assert kinds == ['forward', 'train', 'compile', 'compile', 'e2e', 'profile']
  assert [r['devices'] for r in records if r['benchmark'] == 'compile'] == [1, 2]
  for r in records[:2]:
    assert r['img_per_sec_per_device'] > 0 and 0 < r['mfu'] < 1.5
  e2e = records[-2]
  assert e2e['trainer_img_per_sec_per_device'] > 0 and e2e['trainer_over_bare'] > 0
  assert '== e2e (cpu) ==' in done.stdout and 'trainer/bare' in done.stdout
  assert 'Error writing persistent compilation cache' not in done.stderr
  assert '== profile (cpu) ==' in done.stdout and (tmp_path / 'profile' / '0').is_dir()


@pytest.mark.slow
def test_run_cli_compiles_for_a_tpu_slice_on_each_fsdp_mesh(tmp_path):
  """`--topology --fsdp=1,8`: one compile per mesh, with the HBM and ICI columns."""
  out = tmp_path / 'results.jsonl'
  done = subprocess.run(
      [sys.executable, '-m', 'mixer.benchmarks.run', '--benchmarks=compile',
       '--models=Mixer-S_32', '--image_sizes=64', '--batch_sizes=8', '--topology=v3-8',
       '--fsdp=1,8', f'--out={out}'],
      env=multidevice.subprocess_env(1), capture_output=True, text=True, cwd=multidevice.REPO,
      timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r['fsdp'], r['mesh']) for r in records] == [
      (1, {'data': 8, 'fsdp': 1, 'model': 1}), (8, {'data': 1, 'fsdp': 8, 'model': 1})]
  assert records[1]['params_mib_per_device'] < records[0]['params_mib_per_device'] / 7
  assert all(r['interconnect_gb_per_device'] > 0 for r in records)
  header = next(line for line in done.stdout.splitlines() if 'traffic GB' in line)
  assert header.rstrip().endswith('ICI GB') and ' fsdp ' in header


@pytest.mark.slow
def test_compile_bench_reports_memory_plan():
  [record] = compile_bench.run_on_devices(
      [dict(model='Mixer-S_32', image_size=64, batch_size=4, scan_blocks=True, remat='dots')], 1)
  assert record['scan_blocks'] and record['remat'] == 'dots'
  assert record['total_mib_per_device'] > record['params_mib_per_device'] > 0
  assert record['compile_cpu_seconds'] > 0
  assert record['traffic_gb_per_device'] > 0


def test_compile_bench_compiles_for_a_tpu_slice_and_pairs_scanned_with_unscanned():
  """`--topology`: libtpu compiles the real step for v3-8 cores; the ratio rows pair by setting,
  with the one-block step's time (same remat as the scanned step) over the unscanned one's as
  the floor."""
  configs = compile_bench.with_one_block_steps(
      [dict(model='Mixer-S_32', image_size=64, batch_size=8, scan_blocks=scan, remat=remat)
       for scan, remat in ((False, 'none'), (True, 'dots'))])
  assert configs[2] == dict(model='Mixer-S_32', image_size=64, batch_size=8, scan_blocks=False,
                            remat='dots', num_blocks=1)
  fsdp_config = dict(configs[1], fsdp=8)
  records = compile_bench.run_on_topology(configs + [fsdp_config], 'v3-8')
  assert [(r['device_kind'], r['devices'], r['topology']) for r in records] == [
      ('TPU v3', 8, 'v3-8')] * 4
  assert [r['num_blocks'] for r in records] == [8, 8, 1, 8]  # S/32 has 8 blocks.
  assert [r['fsdp'] for r in records] == [1, 1, 1, 8]
  unscanned, scanned, one_block, fsdp = records
  # libtpu fuses each matmul (a `convolution`) into a `fusion.N` or e.g. a
  # `multiply_reduce_fusion`: it is still a matmul.
  for record in records:
    by_category = record['traffic_gb_by_category_per_device']
    assert by_category['matmul'] > 0.1 * record['traffic_gb_per_device']
    assert by_category['collective'] > 0
  # Data parallelism all-reduces the float32 gradients over the 8 cores: a ring sends
  # 2 * 7/8 of the params' bytes per core. FSDP all-gathers the params for the forward and
  # the backward pass and reduce-scatters the gradients: 3 * 7/8 (less its replicated biases).
  param_gb = unscanned['params_mib_per_device'] * 2**20 / 1e9
  for record in (unscanned, scanned):
    assert record['interconnect_gb_per_device'] == pytest.approx(2 * 7 / 8 * param_gb, rel=0.02)
  assert fsdp['interconnect_gb_per_device'] == pytest.approx(3 * 7 / 8 * param_gb, rel=0.03)
  assert fsdp['params_mib_per_device'] < unscanned['params_mib_per_device'] / 7
  assert fsdp['traffic_gb_per_device'] < scanned['traffic_gb_per_device']
  [pair] = compile_bench.scan_vs_unscanned(records)  # The FSDP step has no unscanned partner.
  assert (pair['scanned_remat'], pair['unscanned_remat']) == ('dots', 'none')
  assert pair['cpu_ratio'] == round(
      scanned['compile_cpu_seconds'] / unscanned['compile_cpu_seconds'], 3)
  assert pair['meets_target_cpu'] == (pair['cpu_ratio'] <= compile_bench.SCAN_TARGET)
  assert pair['one_block_cpu_seconds'] == one_block['compile_cpu_seconds']
  assert pair['floor_cpu_ratio'] == round(
      one_block['compile_cpu_seconds'] / unscanned['compile_cpu_seconds'], 3)
  # Records of another batch size are not paired; without the one-block step, no floor.
  assert compile_bench.scan_vs_unscanned([dict(unscanned, batch_size=16), scanned]) == []
  assert compile_bench.scan_vs_unscanned(
      [dict(unscanned, residual_dtype='bfloat16'), scanned]) == []
  [pair] = compile_bench.scan_vs_unscanned([unscanned, scanned])
  assert pair['floor_cpu_ratio'] is None


def test_one_block_steps_are_added_only_where_both_layouts_compile():
  configs = [dict(model='Mixer-L_16', batch_size=32, scan_blocks=scan, remat=remat)
             for scan, remat in ((False, 'none'), (True, 'none'), (True, 'dots'))]
  configs.append(dict(model='Mixer-B_16', batch_size=32, scan_blocks=True, remat='dots'))
  assert compile_bench.with_one_block_steps(configs) == configs + [
      dict(model='Mixer-L_16', batch_size=32, scan_blocks=False, remat=remat, num_blocks=1)
      for remat in ('none', 'dots')]
  assert compile_bench.with_one_block_steps(configs[1:]) == configs[1:]


# --- hlo_traffic: bytes the compiled step's kernels move -----------------------------------

_LOOP_HLO = """\
HloModule m, entry_computation_layout={(f32[8,4]{1,0})->f32[8,4]{1,0}}

%fused_add (p0: f32[8,4], p1: f32[8,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[8,4]{1,0} parameter(1)
  ROOT %add = f32[8,4]{1,0} add(%p0, %p1)
}

%fused_stack (p0: bf16[3,8,4], p1: bf16[1,8,4], p2: s32[]) -> bf16[3,8,4] {
  %p0 = bf16[3,8,4]{2,1,0} parameter(0)
  %p1 = bf16[1,8,4]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = bf16[3,8,4]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %zero, %zero)
}

%fused_slice (p0: f32[3,16], p1: s32[]) -> bf16[1,4,4] {
  %p0 = f32[3,16]{1,0} parameter(0)
  %view = f32[3,4,4]{2,1,0} bitcast(%p0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[1,4,4]{2,1,0} dynamic-slice(%view, %p1, %zero, %zero), dynamic_slice_sizes={1,4,4}
  ROOT %c = bf16[1,4,4]{2,1,0} convert(%ds)
}

%body (state: (s32[], f32[8,4], bf16[3,8,4])) -> (s32[], f32[8,4], bf16[3,8,4]) {
  %state = (s32[], f32[8,4]{1,0}, bf16[3,8,4]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[8,4]{1,0} get-tuple-element(%state), index=1
  %stack = bf16[3,8,4]{2,1,0} get-tuple-element(%state), index=2
  %loop_add_fusion = f32[8,4]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/MixerBlock_0/add"}
  %convert = bf16[1,8,4]{2,1,0} convert(%loop_add_fusion)
  %weights = f32[3,16]{1,0} constant({...})
  %loop_convert_fusion = bf16[1,4,4]{2,1,0} fusion(%weights, %i), kind=kLoop, calls=%fused_slice
  %loop_dynamic_update_slice_fusion = bf16[3,8,4]{2,1,0} fusion(%stack, %convert, %i), kind=kLoop, calls=%fused_stack
  ROOT %out = (s32[], f32[8,4]{1,0}, bf16[3,8,4]{2,1,0}) tuple(%i, %loop_add_fusion, %loop_dynamic_update_slice_fusion)
}

%cond (state: (s32[], f32[8,4], bf16[3,8,4])) -> pred[] {
  %state = (s32[], f32[8,4]{1,0}, bf16[3,8,4]{2,1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8,4]) -> f32[8,4] {
  %x = f32[8,4]{1,0} parameter(0)
  %gemm_fusion_dot = f32[8,4]{1,0} fusion(%x, %x), kind=kCustom, calls=%fused_add
  %zero = s32[] constant(0)
  %stack = bf16[3,8,4]{2,1,0} constant({...})
  %init = (s32[], f32[8,4]{1,0}, bf16[3,8,4]{2,1,0}) tuple(%zero, %gemm_fusion_dot, %stack)
  %while = (s32[], f32[8,4]{1,0}, bf16[3,8,4]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %y = f32[8,4]{1,0} get-tuple-element(%while), index=1
}
"""  # noqa: E501  (HLO lines as XLA prints them)


def test_hlo_traffic_counts_operands_and_results_and_loop_trips():
  """Exact bytes of a hand-written module: a gemm, then a 3-trip loop that reads its slice of
  a stacked array, adds, and writes its slice of a stack in place."""
  kernels = {k.name: k for k in hlo_traffic.kernels(_LOOP_HLO)}
  assert set(kernels) == {'gemm_fusion_dot', 'loop_add_fusion', 'convert',
                          'loop_convert_fusion', 'loop_dynamic_update_slice_fusion'}
  assert kernels['gemm_fusion_dot'].bytes == 3 * 128  # Two f32[8,4] read, one written.
  assert (kernels['loop_add_fusion'].bytes, kernels['loop_add_fusion'].trips) == (3 * 3 * 128, 3)
  assert kernels['convert'].bytes == 3 * (128 + 64)
  # In place: the bf16[1,8,4] update read and written (and the s32 index read), not the stack.
  assert kernels['loop_dynamic_update_slice_fusion'].bytes == 3 * (64 + 4 + 64)
  # A stack (f32[3,16], read as f32[3,4,4] through a bitcast, which moves nothing) of which
  # each trip reads its f32[1,4,4] slice (64 B), and writes it as bf16.
  assert kernels['loop_convert_fusion'].bytes == 3 * (64 + 4 + 32)
  assert kernels['loop_add_fusion'].source == 'jit(f)/MixerBlock_0/add'
  assert {name: k.category for name, k in kernels.items()} == {
      'gemm_fusion_dot': 'matmul', 'loop_add_fusion': 'elementwise', 'convert': 'elementwise',
      'loop_convert_fusion': 'elementwise', 'loop_dynamic_update_slice_fusion': 'slicing'}
  assert hlo_traffic.array_bytes('(f32[2,3]{1,0}, bf16[5]{0}, pred[])') == 24 + 10 + 1


def test_hlo_traffic_reads_the_trip_count_from_the_loop_condition_where_xla_keeps_none():
  """libtpu's optimized HLO has no known_trip_count: a scanned step's blocks were counted once."""
  bound = _LOOP_HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', '').replace(
      '  ROOT %c = pred[] constant(true)',
      '  %i = s32[] get-tuple-element(%state), index=0\n'
      '  %n = s32[]{:T(256)} constant(3)\n'
      '  ROOT %lt = pred[]{:T(1024)} compare(%i, %n), direction=LT')
  assert 'known_trip_count' not in bound and 'direction=LT' in bound
  expected = {k.name: (k.bytes, k.trips) for k in hlo_traffic.kernels(_LOOP_HLO)}
  assert {k.name: (k.bytes, k.trips) for k in hlo_traffic.kernels(bound)} == expected
  assert max(trips for _, trips in expected.values()) == 3


_MULTI_OUTPUT_HLO = """HloModule m

%nested_slice (p0: f32[3,8,4], p1: s32[]) -> f32[1,8,4] {
  %p0 = f32[3,8,4]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[1,8,4]{2,1,0} dynamic-slice(%p0, %p1, %zero, %zero), dynamic_slice_sizes={1,8,4}
}

%fused_matmul_into_stack (p0: f32[3,8,4], p1: f32[3,8,4], p2: s32[]) -> (f32[3,8,4], f32[1,8,4]) {
  %p0 = f32[3,8,4]{2,1,0:T(8,128)} parameter(0)
  %p1 = f32[3,8,4]{2,1,0:T(8,128)} parameter(1)
  %p2 = s32[]{:T(256)} parameter(2)
  %w = f32[1,8,4]{2,1,0:T(8,128)} fusion(%p1, %p2), kind=kLoop, calls=%nested_slice
  %y = f32[1,8,4]{2,1,0:T(8,128)} multiply(%w, %w)
  %zero = s32[]{:T(256)} constant(0)
  %dus = f32[3,8,4]{2,1,0:T(8,128)} dynamic-update-slice(%p0, %y, %p2, %zero, %zero)
  ROOT %t = (f32[3,8,4]{2,1,0:T(8,128)}, f32[1,8,4]{2,1,0:T(8,128)}) tuple(%dus, %y)
}

ENTRY %main (stack: f32[3,8,4], weights: f32[3,8,4], i: s32[]) -> (f32[3,8,4], f32[1,8,4]) {
  %stack = f32[3,8,4]{2,1,0:T(8,128)} parameter(0)
  %weights = f32[3,8,4]{2,1,0:T(8,128)} parameter(1)
  %i = s32[]{:T(256)} parameter(2)
  ROOT %fusion = (f32[3,8,4]{2,1,0:T(8,128)}, f32[1,8,4]{2,1,0:T(8,128)}) fusion(%stack, %weights, %i), kind=kOutput, calls=%fused_matmul_into_stack
}
"""  # noqa: E501  (HLO lines as libtpu prints them)


def test_hlo_traffic_of_a_multi_output_fusion_writing_into_a_stack():
  """libtpu fuses a matmul with the write of its output into a stack (a tuple root holding
  the dynamic-update-slice) and reads its stacked weights through a nested fusion that
  slices them. Only the slices move: the weights' f32[1,8,4] (128 B) and the index read;
  the update written into the stack and the second output (128 B each); not the stacks."""
  [kernel] = hlo_traffic.kernels(_MULTI_OUTPUT_HLO)
  assert kernel.bytes == 128 + 4 + 128 + 128


_COLLECTIVES_HLO = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%all-reduce-scatter (input: f32[1024]) -> f32[256] {
  %input = f32[1024]{0} parameter(0)
  %all-reduce.9 = f32[1024]{0} all-reduce(%input), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %table = u32[8]{0} constant({0,1,2,3,0,1,2,3})
  %id = u32[] partition-id()
  %index = u32[1]{0} dynamic-slice(%table, %id), dynamic_slice_sizes={1}
  %offset = u32[] bitcast(%index)
  ROOT %slice = f32[256]{0} dynamic-slice(%all-reduce.9, %offset), dynamic_slice_sizes={256}
}

%outer (input: f32[1024]) -> f32[256] {
  %input = f32[1024]{0} parameter(0)
  %inner = f32[256]{0} fusion(%input), kind=kCustom, calls=%all-reduce-scatter
  ROOT %scaled = f32[256]{0} multiply(%inner, %inner)
}

ENTRY %main (p: f32[1024], q: f32[2,256], r: f32[4,256]) -> (f32[1024], f32[8,256], f32[16,256], f32[256], f32[8,256], f32[256]) {
  %p = f32[1024]{0} parameter(0)
  %q = f32[2,256]{1,0} parameter(1)
  %r = f32[4,256]{1,0} parameter(2)
  %all-reduce.1 = f32[1024]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %all-gather.1 = f32[8,256]{1,0} all-gather(%q), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %all-gather.2 = f32[16,256]{1,0} all-gather(%r), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}
  %fusion.3 = f32[256]{0} fusion(%p), kind=kCustom, calls=%all-reduce-scatter
  %all-gather-start.4 = (f32[2,256]{1,0}, f32[8,256]{1,0}) all-gather-start(%q), channel_id=5, replica_groups=[2,4]<=[8], dimensions={0}
  %all-gather-done.4 = f32[8,256]{1,0} all-gather-done(%all-gather-start.4)
  %fusion.5 = f32[256]{0} fusion(%p), kind=kLoop, calls=%outer
  ROOT %t = (f32[1024]{0}, f32[8,256]{1,0}, f32[16,256]{1,0}, f32[256]{0}, f32[8,256]{1,0}, f32[256]{0}) tuple(%all-reduce.1, %all-gather.1, %all-gather.2, %fusion.3, %all-gather-done.4, %fusion.5)
}
"""  # noqa: E501  (HLO lines as XLA and libtpu print them)


def test_hlo_traffic_estimates_what_collectives_send_over_the_interconnect():
  """Ring volumes per device, groups of 4 in each of XLA's three ways of writing them: an
  all-reduce of 4096 B sends 2*3/4 of it, an all-gather to 8192 B 3/4, and libtpu's
  reduce-scatter (a fusion slicing an all-reduce of 4096 B) 3/4 of its input. An async
  all-gather counts at its start (whose result also holds its operand), not at its done.
  A fusion that nests the reduce-scatter fusion one level deeper sends what it sends."""
  kernels = {k.name: k for k in hlo_traffic.kernels(_COLLECTIVES_HLO)}
  assert {name: k.category for name, k in kernels.items()} == dict.fromkeys(
      ('all-reduce.1', 'all-gather.1', 'all-gather.2', 'fusion.3', 'all-gather-start.4',
       'fusion.5'), 'collective')
  assert {name: k.ici_bytes for name, k in kernels.items()} == {
      'all-reduce.1': 2 * 3 * 4096 // 4,   # replica_groups={{0,1,2,3},{4,5,6,7}}
      'all-gather.1': 3 * 8192 // 4,       # replica_groups=[2,4]<=[8]
      'all-gather.2': 3 * 16384 // 4,      # libtpu: mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
      'fusion.3': 3 * 4096 // 4,
      'all-gather-start.4': 3 * 8192 // 4,
      'fusion.5': 3 * 4096 // 4}
  assert hlo_traffic.summary(list(kernels.values()))['interconnect_gb'] == round(
      (6144 + 6144 + 12288 + 3072 + 6144 + 3072) / 1e9, 6)


@pytest.mark.parametrize('name, opcode, fused, expected', [
    # XLA:GPU names a fusion after its hero.
    ('gemm_fusion_dot.3', 'fusion', {'dot', 'parameter'}, 'matmul'),
    ('input_reduce_fusion', 'fusion', {'reduce', 'multiply'}, 'reduction'),
    ('loop_transpose_fusion', 'fusion', {'transpose'}, 'copy/layout'),
    ('loop_dynamic_update_slice_fusion', 'fusion', {'dynamic-update-slice'}, 'slicing'),
    ('loop_convert_fusion', 'fusion', {'convert'}, 'elementwise'),
    # libtpu names most fusions `fusion.N`, and fuses matmuls with their neighbours.
    ('multiply_reduce_fusion.2', 'fusion', {'convolution', 'reduce', 'multiply'}, 'matmul'),
    ('fusion.38', 'fusion', {'convolution', 'dynamic-update-slice'}, 'matmul'),
    ('fusion.12', 'fusion', {'reduce', 'add'}, 'reduction'),
    ('fusion.13', 'fusion', {'dynamic-update-slice', 'add'}, 'slicing'),
    ('fusion.14', 'fusion', {'transpose', 'add'}, 'copy/layout'),
    ('fusion.15', 'fusion', {'add', 'reshape'}, 'elementwise'),
    ('convolution.4', 'convolution', set(), 'matmul'),
    ('all-reduce.103', 'all-reduce', set(), 'collective'),
    ('all-gather-start', 'all-gather-start', set(), 'collective'),
    ('fusion.33', 'fusion', {'all-reduce', 'dynamic-slice', 'partition-id'}, 'collective'),
    ('convert.136', 'convert', set(), 'elementwise'),
    ('reshape.7', 'reshape', set(), 'copy/layout'),
    ('custom-call.2', 'custom-call', set(), 'other'),
])
def test_hlo_traffic_categories_of_gpu_and_tpu_kernels(name, opcode, fused, expected):
  assert hlo_traffic.category(name, opcode, frozenset(fused)) == expected


def test_hlo_traffic_counts_cublas_and_cudnn_custom_calls_as_matmuls():
  """Where XLA:GPU's autotuner picks cuBLAS over Triton, a gemm is a custom call (as
  `--xla_gpu_enable_triton_gemm=false` makes every one): a matmul, not 'other', whose
  bytes are its operands and its output."""
  hlo = textwrap.dedent('''\
      HloModule step

      ENTRY %main (x: bf16[64,32], w: bf16[32,16]) -> bf16[64,16] {
        %x = bf16[64,32]{1,0} parameter(0)
        %w = bf16[32,16]{1,0} parameter(1)
        %custom-call.5 = (bf16[64,16]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul"
        %gte = bf16[64,16]{1,0} get-tuple-element(%custom-call.5), index=0
        %custom-call.6 = bf16[64,16]{1,0} custom-call(), custom_call_target="AllocateBuffer"
        ROOT %add.1 = bf16[64,16]{1,0} add(%gte, %custom-call.6)
      }
      ''')  # noqa: E501  (HLO lines as XLA:GPU prints them)
  kernels = {k.name: k for k in hlo_traffic.kernels(hlo)}
  assert {name: k.category for name, k in kernels.items()} == {
      'custom-call.5': 'matmul', 'custom-call.6': 'other', 'add.1': 'elementwise'}
  # It reads x and w and writes its output; its s8 workspace is scratch, not output.
  assert kernels['custom-call.5'].bytes == (64 * 32 + 32 * 16 + 64 * 16) * 2
  assert hlo_traffic.category('custom-call.9', 'custom-call', target='__cublas$gemm') == 'matmul'
  assert hlo_traffic.category('custom-call.3', 'custom-call',
                              target='__cudnn$convForward') == 'matmul'


@pytest.mark.parametrize('op_name, readable', [
    ('jit(train_step)/jvp(MlpMixer)/MlpMixer._blocks/MixerBlock_7/LayerNorm_0/reduce_sum',
     'forward MixerBlock_*/LayerNorm_0/reduce_sum'),
    ('jit(train_step)/transpose(jvp(MlpMixer))/MlpMixer._blocks/MixerBlock_3/channel_mixing/'
     'Dense_0/jvp(MlpMixer)/MlpMixer._blocks/MixerBlock_3/channel_mixing/Dense_0/checkpoint/'
     'reduce_sum', 'backward MixerBlock_*/channel_mixing/Dense_0/checkpoint/reduce_sum'),
    ('jit(train_step)/transpose(jvp(MlpMixer))/stem/reduce_sum', 'backward stem/reduce_sum'),
    # After the gradients: clipping, the optimizer, the metrics.
    ('jit(train_step)/reduce_sum', 'update reduce_sum'),
    # Scanned blocks read like unrolled ones; remat's second forward pass is `recompute`.
    ('jit(train_step)/transpose(jvp(MlpMixer))/MlpMixer._blocks/while/body/closed_call/'
     'checkpoint/MixerBlocks/MixerBlock_0/LayerNorm_1/mul',
     'backward MixerBlock_*/LayerNorm_1/mul'),
    ('jit(train_step)/transpose(jvp(MlpMixer))/MlpMixer._blocks/while/body/closed_call/'
     'checkpoint/rematted_computation/MixerBlocks/MixerBlock_0/token_mixing/Dense_0/add',
     'recompute MixerBlock_*/token_mixing/Dense_0/add'),
    ('jit(train_step)/jvp(MlpMixer)/MlpMixer._blocks/while/body/closed_call/MixerBlocks/'
     'MixerBlock_0/add', 'forward MixerBlock_*/add'),
    ('jit(train_step)/transpose(jvp(MlpMixer))/MlpMixer._blocks/while/body/closed_call',
     'backward blocks (scan loop)'),
    # The gradients' all-reduces, combined into one by XLA, name all their ops.
    ('jit(train_step)/(transpose(jvp(MlpMixer))/MlpMixer._blocks/MixerBlock_0/LayerNorm_0/'
     'reduce_sum:transpose(jvp(MlpMixer))/stem/dot_general:transpose(jvp(MlpMixer))/head/'
     'reduce_sum)', 'backward MixerBlock_*/LayerNorm_0/reduce_sum (and 2 more ops, combined)'),
    ('', ''),
])
def test_hlo_traffic_names_ops_readably(op_name, readable):
  assert hlo_traffic.readable_source(op_name) == readable


def test_hlo_traffic_of_a_scanned_step_counts_every_block():
  """On a real compiled scanned step, the block body's kernels run once per block."""
  model = models.MlpMixer(num_classes=10, patch_size=8, hidden_dim=32, num_blocks=3,
                          tokens_mlp_dim=16, channels_mlp_dim=64, scan_blocks=True)
  images = jax.ShapeDtypeStruct((4, 32, 32, 3), np.float32)
  params = models.unbox(jax.eval_shape(model.init, jax.random.key(0), images)['params'])

  def loss(p, x):
    return model.apply({'params': p}, x).sum()

  hlo = jax.jit(jax.grad(loss)).lower(params, images).compile().as_text()
  kernels = hlo_traffic.kernels(hlo)
  assert {k.trips for k in kernels} == {1, 3}  # Outside the loops, and in the scanned blocks.
  totals = hlo_traffic.summary(kernels)
  assert totals['traffic_gb'] == pytest.approx(sum(totals['traffic_gb_by_category'].values()),
                                               abs=0.01)


_H100_HLO = os.path.join(os.path.dirname(__file__), 'data', 'h100_mixer_s32_train_step.hlo.gz')


def test_hlo_traffic_of_a_train_step_compiled_for_an_h100(capsys):
  """The S/32 bf16 train step (batch 64) compiled for an H100 without one (docs/benchmarks.md)."""
  assert hlo_traffic.main([], _H100_HLO, top=5, bandwidth=3350) == 0
  out = capsys.readouterr().out
  with gzip.open(_H100_HLO, 'rt') as f:
    kernels = hlo_traffic.kernels(f.read())
  assert len(kernels) > 300 and all(k.trips == 1 for k in kernels)  # Unscanned: no loops.
  by_category = hlo_traffic.summary(kernels)['traffic_gb_by_category']
  # Triton gemms move the weights and activations once; LayerNorm backward is a reduction.
  assert by_category['matmul'] > 0 and by_category['reduction'] > 0
  assert 'largest non-matmul traffic, by jax op' in out
  assert 'backward MixerBlock_*/channel_mixing/Dense_0/checkpoint/' in out
  assert hlo_traffic.main([], os.devnull + '.missing', top=5, bandwidth=3350) == 2
  assert capsys.readouterr().err.startswith('error: cannot read HLO from')


# --- profile: where the train step's device time goes ------------------------------------

_H100_TRACE = os.path.join(os.path.dirname(__file__), 'data', 'h100_mixer_b16_train_trace.json.gz')


def test_profile_sums_the_gpu_kernels_of_a_real_h100_trace():
  """A trace of 3 Mixer-B/16 bf16 train steps (batch 256) taken on an H100 with `profile`."""
  with gzip.open(_H100_TRACE, 'rt', encoding='utf-8') as f:
    trace = json.load(f)
  events = trace['traceEvents']
  gpu_kernels = [e for e in events if e.get('ph') == 'X' and e.get('pid') == 1]
  host_events = [e for e in events if e.get('ph') == 'X' and e.get('pid') != 1]
  assert gpu_kernels and host_events
  times, devices = profile_bench.device_op_times(trace)
  assert devices == 1
  # Every kernel on the GPU stream and nothing from the host threads.
  assert sum(count for _, count in times.values()) == len(gpu_kernels)
  assert sum(micros for micros, _ in times.values()) == pytest.approx(
      sum(e['dur'] for e in gpu_kernels))
  summary = profile_bench.summarize(times, steps=3)
  shares = [summary[f'{name}_pct'] for name in profile_bench.CATEGORY_NAMES]
  assert sum(shares) == pytest.approx(100, abs=0.5)
  assert 60 < summary['device_ms_per_step'] < 70  # The traced steps took 68.1 ms each.
  assert 40 < summary['matmul_pct'] < 50
  top = summary['top_ops'][0]
  assert top['category'] == 'matmul' and top['op'].startswith('nvjet')
  assert top['calls_per_step'] == 24  # Two matmuls of this shape per block, 12 blocks.


_H100_PROFILE = os.path.join(os.path.dirname(__file__), 'data', 'h100_b16_profile')


def test_profile_sorts_a_real_h100_trace_by_the_steps_own_hlo(capsys):
  """What `profile` wrote on an H100 (B/16 bf16, batch 256, 5 steps): the trace and, beside it,
  the step's HLO, whose op names the GPU's kernels carry with '.'/'-' as '_'."""
  categories, sources = profile_bench.read_step_ops(_H100_PROFILE)
  times, devices = profile_bench.device_op_times(profile_bench.read_trace(_H100_PROFILE))
  assert devices == 1
  total = sum(micros for micros, _ in times.values())
  named = {op for op in times if op in categories}
  # Every kernel XLA emitted is found in its HLO; what it does not name is cuBLAS (matmuls by
  # their names) or a memcpy.
  assert all(op in named for op in times
             if re.match(r'(loop|input|gemm_fusion|wrapped|triton|fusion)_', op)), (
                 sorted(set(times) - named))
  unnamed = set(times) - named
  assert any(op.startswith('nvjet') for op in unnamed)
  assert {profile_bench.category(op) for op in unnamed} <= {'matmul', 'memcpy'}
  assert sum(times[op][0] for op in named) > 0.5 * total
  # The HLO says what a generically named fusion holds: here the LayerNorm backward's
  # reductions (by its name alone, elementwise), once per block but the first and last.
  assert categories['fusion_1291'] == 'reduction' != profile_bench.category('fusion_1291')
  assert 'LayerNorm' in sources['fusion_1291'] and times['fusion_1291'][1] == 5 * 10
  moved = sum(times[op][0] for op in named
              if categories[op] != profile_bench.category(op)) / total
  assert moved > 0.05  # The HLO changes the picture, not only the labels.
  # The CLI reads the same folder and prints these shares.
  shares = {}
  for op, (micros, _) in times.items():
    name = profile_bench.category(op, categories)
    shares[name] = shares.get(name, 0) + 100 * micros / total
  assert profile_bench.main([], _H100_PROFILE, steps=5, top=5) == 0
  out = capsys.readouterr().out
  assert f'device time: {total / 5 / 1000:.2f} ms per step' in out.lower()
  for name in ('matmul', 'reduction', 'elementwise'):
    assert f'{name} {shares[name]:.1f}%' in out
  assert 'backward MixerBlock_*/' in out


@pytest.mark.parametrize('op, expected', [
    ('sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16', 'convolution'),  # cuDNN, not a matmul.
    ('loop_convert_fusion_22', 'elementwise'),                          # 'convert' is no conv.
    ('nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_splitK_NTN', 'matmul'),
    ('gemm_fusion_dot_49', 'matmul'),
    ('input_transpose_fusion_35', 'copy/layout'),
    ('loop_dynamic_update_slice_fusion_5', 'slicing'),  # A scanned block's slice of a stack.
    ('input_add_reduce_fusion_57', 'reduction'),
    ('memcpy128', 'memcpy'),
    ('Memset 3', 'memcpy'),
    # NCCL's kernels and XLA's collectives reduce, but over the interconnect.
    ('ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm, unsigned long, ncclWork*)',
     'collective'),
    ('ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL', 'collective'),
    ('all-reduce.3', 'collective'),
    ('all-gather-start.1', 'collective'),
    ('fusion.12', 'elementwise'),  # By its name alone; what it is, only the HLO says.
])
def test_profile_categories(op, expected):
  assert profile_bench.category(op) == expected


def test_profile_categories_come_from_the_steps_hlo_where_it_names_the_op():
  hlo = textwrap.dedent('''\
      HloModule step

      %fused_computation (p0: bf16[64,32], p1: bf16[32,32]) -> bf16[64,32] {
        %p0 = bf16[64,32]{1,0} parameter(0)
        %p1 = bf16[32,32]{1,0} parameter(1)
        %convolution.1 = bf16[64,32]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf
        ROOT %multiply.1 = bf16[64,32]{1,0} multiply(%convolution.1, %convolution.1)
      }

      ENTRY %main (x: bf16[64,32], w: bf16[32,32]) -> bf16[64,32] {
        %x = bf16[64,32]{1,0} parameter(0)
        %w = bf16[32,32]{1,0} parameter(1)
        %fusion.12 = bf16[64,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_computation
        ROOT %loop_add_fusion.2 = bf16[64,32]{1,0} add(%fusion.12, %x)
      }
      ''')
  categories, _ = profile_bench.step_ops(hlo)
  # A TPU trace names ops as the HLO does; XLA:GPU's kernels write '_' for '.'.
  assert categories == {'fusion.12': 'matmul', 'fusion_12': 'matmul',
                        'loop_add_fusion.2': 'elementwise', 'loop_add_fusion_2': 'elementwise'}
  assert profile_bench.category('fusion.12', categories) == 'matmul'
  assert profile_bench.category('fusion_12', categories) == 'matmul'
  # Kernels the HLO does not name (cuBLAS, cuDNN, memcpy) go by their names.
  assert profile_bench.category('nvjet_sm90_tst_128x160', categories) == 'matmul'
  assert profile_bench.category('memcpy32_post', categories) == 'memcpy'
  assert set(hlo_traffic.CATEGORIES) <= set(profile_bench.CATEGORY_NAMES)


def test_profile_sorts_a_tpu_steps_ops_by_the_hlo_written_beside_the_trace(tmp_path, capsys):
  """A TPU's "XLA Ops" line names ops as the HLO does (`fusion.12`), and libtpu fuses each
  matmul with its neighbours: only the step's HLO, which `start_trace` writes beside the
  trace, says which ops are matmuls. The real S/32 step compiled by libtpu for a v3-8; its
  trace written as a TPU writes one (no TPU here), each kernel lasting its bytes in kB, so
  that each category's share of the time must be its share of `hlo_traffic`'s bytes."""
  from mixer import compile_check, trainer_setup  # pylint: disable=g-import-not-at-top
  devices, _ = compile_check.topology_devices('v3-8')
  config = model_bench.bench_config('Mixer-S_32', batch_size=8, image_size=64)
  config.mesh.data = -1
  compiled = trainer_setup.compile_train_step(trainer_setup.build(config, devices))
  trace_dir = tmp_path / 'profile'
  profile_bench.start_trace(str(trace_dir), compiled)  # As the trainer's profile_steps does.
  jax.profiler.stop_trace()
  [run_folder] = (trace_dir / 'plugins' / 'profile').iterdir()
  for host_trace in run_folder.glob('*.trace.json.gz'):  # This CPU host's: no device ops.
    host_trace.unlink()
  kernels = hlo_traffic.kernels(compiled.as_text())
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:TPU:0'}},
            {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 2, 'args': {'name': 'XLA Ops'}}]
  events += [{'ph': 'X', 'pid': 1, 'tid': 2, 'name': k.name, 'dur': k.bytes / 1e3}
             for k in kernels]
  (run_folder / 'tpu.trace.json.gz').write_bytes(
      gzip.compress(json.dumps({'traceEvents': events}).encode()))

  assert profile_bench.main([], str(trace_dir), steps=1, top=3) == 0
  first_line = capsys.readouterr().out.splitlines()[0]
  by_category = hlo_traffic.summary(kernels)['traffic_gb_by_category']
  shares = {name: 100 * gb / sum(by_category.values()) for name, gb in by_category.items()}
  summary = profile_bench.summarize_trace(profile_bench.read_trace(str(trace_dir)), 1, 15,
                                          *profile_bench.read_step_ops(str(trace_dir)))
  for name in hlo_traffic.CATEGORIES:
    assert summary[f'{name}_pct'] == pytest.approx(shares.get(name, 0), abs=0.1), name
  assert summary['matmul_pct'] > 10 and summary['collective_pct'] > 0
  assert f'matmul {summary["matmul_pct"]}%' in first_line
  assert summary['top_ops'][0]['source']  # The jax op, from the HLO's metadata.
  # By their names alone, libtpu's matmul fusions would read as elementwise.
  by_name = profile_bench.summarize_trace(profile_bench.read_trace(str(trace_dir)), steps=1)
  assert by_name['matmul_pct'] < summary['matmul_pct'] / 2
  # An HLO file cut short (a kill while it was written) is not trusted: one error line.
  hlo_file = trace_dir / profile_bench.STEP_HLO
  hlo_file.write_bytes(hlo_file.read_bytes()[:1000])
  assert profile_bench.main([], str(trace_dir), steps=1, top=3) == 2
  assert capsys.readouterr().err.startswith(
      f'error: {trace_dir}/{profile_bench.STEP_HLO} is not a readable HLO module (')


def test_profile_reads_tpu_xla_ops_lines_per_device_and_skips_the_summary_lines():
  """Two TPU cores ran the same 2 steps: times are per device, not summed over the cores."""
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 9, 'args': {'name': '/host:CPU'}},
            {'ph': 'X', 'pid': 9, 'tid': 5, 'name': 'fusion.1', 'dur': 999.0}]
  for pid in (3, 4):
    events += [
        {'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': f'/device:TPU:{pid}'}},
        {'ph': 'M', 'name': 'thread_name', 'pid': pid, 'tid': 1, 'args': {'name': 'XLA Modules'}},
        {'ph': 'M', 'name': 'thread_name', 'pid': pid, 'tid': 2, 'args': {'name': 'XLA Ops'}},
        {'ph': 'X', 'pid': pid, 'tid': 1, 'name': 'jit_train_step', 'dur': 100.0},
        {'ph': 'X', 'pid': pid, 'tid': 2, 'name': 'fusion.1', 'dur': 30.0},
        {'ph': 'X', 'pid': pid, 'tid': 2, 'name': 'fusion.1', 'dur': 30.0},
        {'ph': 'X', 'pid': pid, 'tid': 2, 'name': 'copy.2', 'dur': 40.0}]
  trace = {'traceEvents': events}
  assert profile_bench.device_op_times(trace) == (
      {'fusion.1': (120.0, 4), 'copy.2': (80.0, 2)}, 2)
  summary = profile_bench.summarize_trace(trace, steps=2)
  assert summary['device_ms_per_step'] == 0.05  # 100 us per core over 2 steps.
  assert summary['copy/layout_pct'] == 40.0 and summary['elementwise_pct'] == 60.0
  assert summary['top_ops'][0] == {'op': 'fusion.1', 'category': 'elementwise',
                                   'ms_per_step': 0.03, 'calls_per_step': 1.0, 'source': ''}


def test_profile_start_trace_goes_on_when_the_hlo_cannot_be_written(tmp_path, caplog):
  """The HLO beside the trace only helps sort its ops: a training run's profile window must
  not stop the run where it cannot be written."""
  class Compiled:
    def as_text(self):
      return 'HloModule step'
  (tmp_path / profile_bench.STEP_HLO).mkdir()  # Writing a file there fails.
  with caplog.at_level('WARNING'):
    profile_bench.start_trace(str(tmp_path), Compiled())
    jax.profiler.stop_trace()
  assert f'Could not write {tmp_path / profile_bench.STEP_HLO} beside the profile' in caplog.text
  assert list((tmp_path / 'plugins' / 'profile').iterdir())  # The trace itself was written.


def test_profile_traces_the_train_step(tmp_path):
  """The real step traced here. On the CPU backend its ops are found on XLA's host threads
  by their HLO names: each op of the step once per step, matmuls among them."""
  config = model_bench.bench_config('Mixer-S_32', batch_size=2, image_size=64)
  record = profile_bench.run(config, str(tmp_path / 'trace'), steps=2)
  assert record['benchmark'] == 'profile' and record['step_seconds'] > 0
  trace = profile_bench.read_trace(str(tmp_path / 'trace'))
  assert trace is not None
  wall_ms = 1000 * record['step_seconds']
  assert record['matmul_pct'] > 5 and record['top_ops']
  # Each of the largest ops says which jax op it came from, read from the step's HLO.
  assert {op['source'].split()[0] for op in record['top_ops']} <= {
      'forward', 'backward', 'recompute', 'update'}
  categories, sources = profile_bench.read_step_ops(str(tmp_path / 'trace'))
  matmul_sources = [sources[name] for name, kind in categories.items() if kind == 'matmul']
  # Model matmuls (the stem is one too), some fused with a transpose next to them.
  assert all(matmul_sources) and sum('dot_general' in s for s in matmul_sources) > len(
      matmul_sources) / 2
  if jax.default_backend() != 'cpu':
    assert record['ops_on'] == 'device' and 0 < record['device_ms_per_step'] <= wall_ms
    return
  assert record['ops_on'] == 'cpu threads'
  # CPU time of ops on up to all cores: more than none, at most every core for the step.
  assert 0 < record['device_ms_per_step'] <= os.cpu_count() * wall_ms
  op_times = profile_bench.host_op_times(trace, categories)
  entry_ops = {k.name for k in hlo_traffic.kernels(
      gzip.decompress((tmp_path / 'trace' / profile_bench.STEP_HLO).read_bytes()).decode())}
  assert set(op_times) == entry_ops  # S/32 unscanned: no loops, every op ran...
  assert {count for _, count in op_times.values()} == {2}  # ... once in each of the 2 steps.
  # Without the HLO there is no telling ops from the executor's own events: no summary.
  assert profile_bench.summarize_trace(trace, steps=2)['device_ms_per_step'] is None


def test_profile_cli_sums_a_training_runs_trace(tmp_path):
  """`config.profile_steps` leaves plugins/profile/<time>/<host>.trace.json.gz in the workdir."""
  run_folder = tmp_path / 'profile' / 'plugins' / 'profile' / '2026_11_26_09_28_00'
  run_folder.mkdir(parents=True)
  with open(_H100_TRACE, 'rb') as src, open(run_folder / 'h100.trace.json.gz', 'wb') as dst:
    dst.write(src.read())
  (tmp_path / 'profile' / 'plugins' / 'profile' / '2026_11_26_09_00_00').mkdir()  # Older, empty.
  done = subprocess.run(
      [sys.executable, '-m', 'mixer.benchmarks.profile_bench',
       f'--trace_dir={tmp_path / "profile"}', '--steps=3', '--top=3'],
      capture_output=True, text=True, cwd=multidevice.REPO, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  assert lines[0].startswith('device time: 65.531 ms per step (') and 'matmul 44.1%' in lines[0]
  assert len(lines) == 2 + 3 and 'nvjet' in lines[2]
  # A newer run folder without a trace is not answered with the older run's trace.
  (tmp_path / 'profile' / 'plugins' / 'profile' / '2026_11_26_10_00_00').mkdir()
  newest_empty = subprocess.run(
      [sys.executable, '-m', 'mixer.benchmarks.profile_bench',
       f'--trace_dir={tmp_path / "profile"}'],
      capture_output=True, text=True, cwd=multidevice.REPO, timeout=300, check=False)
  assert newest_empty.returncode == 2
  empty = subprocess.run(
      [sys.executable, '-m', 'mixer.benchmarks.profile_bench', f'--trace_dir={tmp_path}'],
      capture_output=True, text=True, cwd=multidevice.REPO, timeout=300, check=False)
  assert empty.returncode == 2
  assert empty.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path} holds no plugins')


# --- plot: docs/benchmarks.png -------------------------------------------------------------

def test_plot_draws_the_three_panels_and_keeps_close_models_labels_apart(tmp_path):
  """The forward sweep of docs/benchmarks.md (CPU-ms per image at 224 px, batch 2)."""
  from mixer.benchmarks import plot  # pylint: disable=g-import-not-at-top
  models_measured = [('Mixer-S_32', 2.0, 27.1), ('Mixer-B_32', 6.47, 81.3),
                     ('Mixer-S_16', 7.55, 82.7), ('Mixer-L_32', 22.5, 283.0),
                     ('Mixer-B_16', 25.2, 265.0)]
  # L/32 costs more than B/16 for fewer GFLOPs: its label goes above, B/16's below; B/32
  # and S/16, 0.07 decades apart, likewise.
  xs, ys = [m[1] for m in models_measured], [m[2] for m in models_measured]
  assert plot._label_above(xs, ys) == [False, True, False, True, False]
  assert plot._label_above([1.0, 2.0], [1.0, 3.0]) == [False, True]
  records = [dict(benchmark='forward', model=name, image_size=224, batch_size=2,
                  dtype='float32', model_gflops_per_image=gflops, cpu_ms_per_image=ms,
                  device_kind='cpu', devices=1) for name, gflops, ms in models_measured]
  records += [dict(records[0], batch_size=b, cpu_ms_per_image=ms)
               for b, ms in ((1, 29.4), (8, 24.1))]
  records += [dict(records[2], image_size=s, cpu_ms_per_image=ms)
               for s, ms in ((112, 25.2), (448, 335.0))]
  out = plot.plot(records, str(tmp_path / 'benchmarks.png'))
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  height, width, _ = matplotlib.image.imread(out).shape
  assert (width, height) == (1650, 495)
  with pytest.raises(ValueError, match='No forward/train records'):
    plot.plot([], str(tmp_path / 'empty.png'))
