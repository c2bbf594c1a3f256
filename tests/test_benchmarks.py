"""The benchmark suite, the 'synthetic' source and the persistent compilation cache.

Fast tests check what each benchmark computes (FLOP counts against XLA's own,
per-device bytes under FSDP, the table); the end-to-end runs are `slow`.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mixer import input_pipeline, models
from mixer.benchmarks import compile_bench, model_bench, run as bench_run
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
       'dtype': 'float32', 'scan_blocks': False, 'remat': 'none', 'device_kind': 'cpu',
       'img_per_sec_per_device': 3.08, 'step_seconds': 2.5934, 'model_gflops_per_image': 6.015,
       'mfu': 0.5472, 'memory_bytes_per_device': 478233064},
      {'benchmark': 'cache', 'model': 'Mixer-S_32', 'first_start_compile_cpu_seconds': 10.0,
       'second_start_compile_cpu_seconds': 1.0, 'second_over_first': 0.1,
       'target_second_over_first': 0.2},
  ]
  table = bench_run.format_table(records)
  assert '== train (cpu) ==' in table and '== cache' in table
  train_lines = table.split('\n\n')[0].splitlines()
  assert train_lines[1].split()[:3] == ['model', 'res', 'batch']
  assert train_lines[3].split() == ['Mixer-S_32', '224', '8', 'float32', 'False', 'none', '3.08',
                                    '2593.4', '6.01', '0.547', '-', '-', '456']


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


@pytest.mark.slow
def test_run_cli_writes_json_lines_and_a_table(tmp_path):
  out = tmp_path / 'results.jsonl'
  done = subprocess.run(
      [sys.executable, '-m', 'mixer.benchmarks.run', '--benchmarks=forward,train,compile,e2e',
       '--models=Mixer-S_32', '--image_sizes=64', '--batch_sizes=4', '--devices=1,2',
       '--steps=1', '--repeats=1', '--e2e_steps=8', f'--out={out}'],
      env=multidevice.subprocess_env(1), capture_output=True, text=True, cwd=multidevice.REPO,
      timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  kinds = [r['benchmark'] for r in records]
  assert kinds == ['forward', 'train', 'compile', 'compile', 'e2e']
  assert [r['devices'] for r in records if r['benchmark'] == 'compile'] == [1, 2]
  for r in records[:2]:
    assert r['img_per_sec_per_device'] > 0 and 0 < r['mfu'] < 1.5
  e2e = records[-1]
  assert e2e['trainer_img_per_sec_per_device'] > 0 and e2e['trainer_over_bare'] > 0
  assert '== e2e (cpu) ==' in done.stdout and 'trainer/bare' in done.stdout


@pytest.mark.slow
def test_compile_bench_reports_memory_plan():
  [record] = compile_bench.run_on_devices(
      [dict(model='Mixer-S_32', image_size=64, batch_size=4, scan_blocks=True, remat='dots')], 1)
  assert record['scan_blocks'] and record['remat'] == 'dots'
  assert record['total_mib_per_device'] > record['params_mib_per_device'] > 0
  assert record['compile_cpu_seconds'] > 0


def test_compile_bench_compiles_for_a_tpu_slice_and_pairs_scanned_with_unscanned():
  """`--topology`: libtpu compiles the real step for v3-8 cores; the ratio rows pair by setting."""
  configs = [dict(model='Mixer-S_32', image_size=64, batch_size=8, scan_blocks=scan, remat=remat)
             for scan, remat in ((False, 'none'), (True, 'dots'))]
  records = compile_bench.run_on_topology(configs, 'v3-8')
  assert [(r['device_kind'], r['devices'], r['topology']) for r in records] == [
      ('TPU v3', 8, 'v3-8')] * 2
  [pair] = compile_bench.scan_vs_unscanned(records)
  assert (pair['scanned_remat'], pair['unscanned_remat']) == ('dots', 'none')
  assert pair['cpu_ratio'] == round(
      records[1]['compile_cpu_seconds'] / records[0]['compile_cpu_seconds'], 3)
  assert pair['meets_target_cpu'] == (pair['cpu_ratio'] <= compile_bench.SCAN_TARGET)
  # Records of another batch size are not paired.
  other = dict(records[0], batch_size=16)
  assert compile_bench.scan_vs_unscanned([other, records[1]]) == []
