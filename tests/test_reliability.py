"""Issue 11 (reliability): one test per defect, each written to fail on the code before the fix.

Numbers in the test names are the issue's numbered defects. Most run at the
level where the defect lives (the input iterator, the checkpointer, the lock)
so they take seconds; the ones that need the trainer share one finished tiny
run (`finished_run`) and copy it. `test_chaos_*` (slow) kills, corrupts,
bit-flips and fills the disk under a real run and compares with an
uninterrupted one.
"""

import glob
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from flax import traverse_util

from mixer import checkpoint, config_lib, input_pipeline, paths, reporting, train
from mixer import trainer_setup, weights, workdir as workdir_lib
from tests import multidevice
from tests.test_train_e2e import main_command, tiny_config

REPO = multidevice.REPO


def _flat_npz(path):
  return traverse_util.flatten_dict(weights.load_npz(path), sep='/')


def _assert_same_params(a_path, b_path):
  a, b = _flat_npz(a_path), _flat_npz(b_path)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished tiny run: checkpoints at steps 6 and 12, metrics.jsonl, final.npz."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  train.train_and_evaluate(tiny_config(total_steps=12, checkpoint_every=6, eval_every=12),
                           workdir)
  return workdir


def _copy(run, tmp_path):
  target = str(tmp_path / 'run')
  shutil.copytree(run, target)
  return target


def _run_cli(*args, env=None, timeout=300):
  return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True,
                        env={**multidevice.subprocess_env(1), **(env or {})}, timeout=timeout)


# ---------------------------------------------------------------------------
# 1. A user's file is overwritten; a foreign metrics.jsonl fails the run.
# ---------------------------------------------------------------------------
def test_1_existing_final_npz_is_refused_and_kept(tmp_path):
  users_file = tmp_path / 'final.npz'
  users_file.write_bytes(b'the user\'s own weights')
  with pytest.raises(FileExistsError, match='final.npz already exists'):
    train.train_and_evaluate(tiny_config(total_steps=6), str(tmp_path))
  assert users_file.read_bytes() == b'the user\'s own weights'
  assert not glob.glob(str(tmp_path / 'checkpoints' / '*'))


def test_1_foreign_metrics_lines_do_not_fail_the_curves(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 1, "train/loss": 2.0}\nnot json\n[1, 2]\n{"step": "x"}\n'
      '{"step": 2, "train/loss": "nan?"}\n{"step": 3, "train/loss": 1.5}\n')
  assert reporting.plot_curves(str(tmp_path)) == str(tmp_path / 'training_curves.png')
  assert reporting.read_metrics(str(tmp_path / 'metrics.jsonl'))['train/loss'] == [
      (1, 2.0), (3, 1.5)]


# ---------------------------------------------------------------------------
# 2. Diverged models are saved.
# ---------------------------------------------------------------------------
def test_2_nonfinite_update_is_never_checkpointed_or_exported(tmp_path):
  # lr=1e39 is a finite Python float (validate accepts it) but inf in float32:
  # the loss of step 1 (computed before the update) is finite, the params after it are not.
  config = tiny_config(total_steps=3, checkpoint_every=1, log_every=1, eval_every=3, lr=1e39)
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert 'at step 1' in message and 'There is no checkpoint' in message
  assert 'config.lr' in message  # The likely cause.
  assert not os.path.exists(tmp_path / 'final.npz')
  assert not [d for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]


def test_2_nan_init_weights_are_named_as_the_cause(tmp_path, finished_run):
  params = weights.load_npz(os.path.join(finished_run, 'final.npz'))
  params['stem']['kernel'] = np.full_like(params['stem']['kernel'], np.nan)
  bad = str(tmp_path / 'nan.npz')
  weights.save_npz(params, bad)
  config = tiny_config(init_from=bad, init_head='keep')
  with pytest.raises(train.NonFiniteLossError, match=r'init_from=.*nan\.npz.*stem.*kernel') as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'step None' not in str(e.value)


# ---------------------------------------------------------------------------
# 3. Bad data hangs the run.
# ---------------------------------------------------------------------------
def _image_folder(root, files_per_class=8, bad=(), truncated=()):
  """<root>/{train,test}/c{0,1}/NN.jpg; `bad` indices (of train) are not images."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  index = 0
  for split in ('train', 'test'):
    for label in range(2):
      folder = root / split / f'c{label}'
      folder.mkdir(parents=True)
      for i in range(files_per_class):
        path = folder / f'{i:02d}.jpg'
        pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        if split == 'train' and index in bad:
          path.write_bytes(b'this is not an image')
        if split == 'train' and index in truncated:
          path.write_bytes(path.read_bytes()[:200])
        index += split == 'train'
  return f'imagefolder:{root}'


def _folder_config(dataset):
  return tiny_config(dataset=dataset, num_classes=2, batch_size=4, image_size=16)


def test_3_undecodable_training_data_stops_with_a_clear_error(tmp_path):
  dataset = _image_folder(tmp_path, files_per_class=60, bad=range(120))
  iterator = input_pipeline.create_train_iterator(_folder_config(dataset))
  outcome = {}

  def consume():
    try:
      for _ in range(1000):
        next(iterator)
      outcome['result'] = 'no error'
    except Exception as error:  # pylint: disable=broad-except
      outcome['result'] = error

  start = time.monotonic()
  thread = threading.Thread(target=consume, daemon=True)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive(), 'the iterator hangs on undecodable data'
  error = outcome['result']
  assert isinstance(error, input_pipeline.BadDataError), error
  assert 'none of the first 100 records' in str(error)
  assert re.search(r'/train/c[01]/\d\d\.jpg', str(error))  # Names the files.
  assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------
# 4. Two runs share a workdir.
# ---------------------------------------------------------------------------
def test_4_second_run_on_a_live_workdir_is_refused_at_once(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom mixer import workdir\n'
       f'with workdir.lock({str(tmp_path)!r}):\n  print("locked", flush=True)\n'
       '  time.sleep(120)'], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    start = time.monotonic()
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f'pid {holder.pid}'):
      train.train_and_evaluate(tiny_config(total_steps=6), str(tmp_path))
    assert time.monotonic() - start < 10
    assert not os.path.exists(tmp_path / 'checkpoints')
  finally:
    holder.kill()
    holder.wait()


def test_4_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  import socket  # pylint: disable=g-import-not-at-top
  (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': dead.pid, 'started': '2020-01-01T00:00:00+00:00'}))
  with caplog.at_level(logging.WARNING):
    with workdir_lib.lock(str(tmp_path)):
      held = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())
  assert held['pid'] == os.getpid()
  assert f'pid {dead.pid}' in caplog.text and 'stale lock' in caplog.text
  # Released: a next run gets it without a warning.
  with workdir_lib.lock(str(tmp_path)):
    pass


# ---------------------------------------------------------------------------
# 5, 6. A corrupted or bit-flipped latest checkpoint.
# ---------------------------------------------------------------------------
def _data_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', '*'), recursive=True)
           if os.path.isfile(f) and '/d/' in f]
  return sorted(files, key=os.path.getsize, reverse=True)


def _truncate(step_dir):
  path = _data_files(step_dir)[0]
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove_manifest(step_dir):
  for path in glob.glob(os.path.join(step_dir, 'state', '**', 'manifest.ocdbt'), recursive=True):
    os.remove(path)


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, 'meta', 'metadata'), 'w', encoding='utf-8') as f:
    f.write('{"model": ')


def _flip_one_bit(step_dir):
  """Flips one bit in the middle of the largest array file (silent before fingerprints)."""
  path = _data_files(step_dir)[0]
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def _restore(workdir):
  config = tiny_config(total_steps=12, checkpoint_every=6, eval_every=12)
  setup = trainer_setup.build(config)
  checkpointer = checkpoint.TrainCheckpointer(workdir, 6, 3)
  try:
    with setup.context():
      return checkpointer.restore_latest(setup.abstract_state)
  finally:
    checkpointer.close()


@pytest.mark.parametrize('damage', [_truncate, _remove_manifest, _garble_metadata, _flip_one_bit])
def test_5_6_damaged_latest_checkpoint_is_moved_aside_and_the_previous_restores(
    tmp_path, finished_run, damage, caplog):
  workdir = _copy(finished_run, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '12'))
  with caplog.at_level(logging.WARNING):
    state, _, step = _restore(workdir)
  assert step == 6 and int(state['step']) == 6
  assert 'Checkpoint step 12' in caplog.text and 'moved it to' in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['6']
  moved = os.listdir(os.path.join(workdir, checkpoint.MOVED_ASIDE_DIR))
  assert len(moved) == 1 and moved[0].startswith('12.')  # Kept, never deleted.


def test_5_no_usable_checkpoint_is_a_clear_error_and_nothing_moves(tmp_path, finished_run):
  workdir = _copy(finished_run, tmp_path)
  for step in ('6', '12'):
    _garble_metadata(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint .* can be restored'):
    _restore(workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6']
  assert not os.path.exists(os.path.join(workdir, checkpoint.MOVED_ASIDE_DIR))


def test_6_fingerprint_changes_with_one_flipped_bit():
  values = np.arange(1000, dtype=np.float32)
  flipped = values.copy()
  flipped.view(np.uint32)[500] ^= 1 << 31
  swapped = values.copy()
  swapped[[3, 4]] = swapped[[4, 3]]
  prints = [checkpoint.fingerprint({'a': v}) for v in (values, flipped, swapped)]
  assert prints[0] != prints[1] and prints[0] != prints[2]
  assert prints[0] == checkpoint.fingerprint({'a': values.copy()})


# ---------------------------------------------------------------------------
# 7. Resume is not bit-exact with a bad image.
# ---------------------------------------------------------------------------
def test_7_resume_with_an_undecodable_image_is_bit_exact(tmp_path):
  dataset = _image_folder(tmp_path, files_per_class=5, bad=[2])
  config = _folder_config(dataset)
  config.input.max_bad_fraction = 0.5
  uninterrupted = input_pipeline.create_train_iterator(config)
  batches = [next(uninterrupted) for _ in range(8)]
  for start in (1, 3, 5):
    resumed = input_pipeline.create_train_iterator(config, start_step=start)
    for step in range(start, 8):
      batch = next(resumed)
      for key in ('image', 'labels'):
        np.testing.assert_array_equal(batch[key], batches[step][key], err_msg=f'{start} {step}')


def test_10_undecodable_record_warning_names_the_file(tmp_path, caplog):
  dataset = _image_folder(tmp_path, files_per_class=5, truncated=[3])
  config = _folder_config(dataset)
  config.input.max_bad_fraction = 0.5
  iterator = input_pipeline.create_train_iterator(config)
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      next(iterator)
  assert os.path.join('train', 'c0', '03.jpg') in caplog.text


# ---------------------------------------------------------------------------
# 8. A preempted run looks finished.
# ---------------------------------------------------------------------------
def test_8_preempted_run_exits_75(tmp_path):
  script = ('import sys\nfrom absl import app\nfrom mixer import checkpoint, main\n'
            'checkpoint.TrainCheckpointer.reached_preemption = lambda self, step: step == 2\n'
            'app.run(main.main, flags_parser=main._parse_flags)\n')
  command = main_command(str(tmp_path), '--config.total_steps=12')
  result = _run_cli(sys.executable, '-c', script, *command[3:])
  assert result.returncode == 75, result.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'checkpoints' / '2')
  assert not os.path.exists(tmp_path / 'final.npz')


# ---------------------------------------------------------------------------
# 9. Errors are tracebacks.
# ---------------------------------------------------------------------------
def test_9_known_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path):
  wrong_classes = main_command(str(tmp_path / 'a'), '--config.num_classes=7')
  result = _run_cli(*wrong_classes)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert "error: Dataset 'digits' has 10 classes but config.num_classes=7" in result.stderr
  verbose = _run_cli(*wrong_classes, '--verbose')
  assert verbose.returncode != 0 and 'Traceback' in verbose.stderr

  a_file = tmp_path / 'file'
  a_file.write_text('not a directory')
  result = _run_cli(*main_command(str(a_file)))
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert f'error: File exists: {a_file}' in result.stderr and '--workdir' in result.stderr


# ---------------------------------------------------------------------------
# 10. Smaller defects.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('override', [dict(log_every=0), dict(checkpoint_every=0), dict(lr=-1e-3),
                                      dict(lr=float('nan'))])
def test_10_zero_intervals_and_bad_lr_are_config_errors(override):
  config = tiny_config()
  config.update(override)
  with pytest.raises(ValueError, match=f'config.{next(iter(override))}='):
    config_lib.validate(config)


def test_10_empty_class_folder_is_an_error(tmp_path):
  dataset = _image_folder(tmp_path, files_per_class=2)
  (tmp_path / 'train' / 'c9').mkdir()
  (tmp_path / 'test' / 'c9').mkdir()
  with pytest.raises(ValueError, match=r"\['c9'\] hold no images"):
    input_pipeline.create_train_iterator(_folder_config(dataset))


def test_10_resume_writes_each_step_once_and_removes_stale_temp_files(tmp_path, finished_run):
  workdir = _copy(finished_run, tmp_path)
  # A run killed after logging step 12 but before its checkpoint (and in the export).
  os.rename(os.path.join(workdir, 'checkpoints', '12'), str(tmp_path / 'kept_12'))
  os.remove(os.path.join(workdir, 'final.npz'))
  stale = os.path.join(workdir, '.final.npz.abc123.tmp')
  with open(stale, 'wb') as f:
    f.write(b'half an export')
  train.train_and_evaluate(tiny_config(total_steps=12, checkpoint_every=6, eval_every=12),
                           workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    steps = [json.loads(line)['step'] for line in f if 'train/loss' in line]
  assert steps == sorted(set(steps)) and steps[-1] == 12
  assert not os.path.exists(stale)
  _assert_same_params(os.path.join(finished_run, 'final.npz'),
                      os.path.join(workdir, 'final.npz'))


def test_10_bucket_metrics_writes_do_not_grow_with_the_run(tmp_path, monkeypatch):
  """On gs:// each write used to rewrite the whole file: bytes written grew quadratically."""
  monkeypatch.setattr(paths, 'is_remote', lambda path: True)  # Local files through tf.io.gfile.
  monkeypatch.setattr(reporting, '_REMOTE_FLUSH_SECONDS', 0.0)  # Upload at every write.
  written = []
  real_gfile = reporting.tf.io.gfile.GFile

  class CountingGFile(real_gfile):
    def write(self, data):
      written.append(len(data))
      return super().write(data)

  monkeypatch.setattr(reporting.tf.io.gfile, 'GFile', CountingGFile)
  path = str(tmp_path / 'metrics.jsonl')
  writer = reporting.JsonlWriter(path)
  for step in range(1, 201):
    writer.write_scalars(step, {'train/loss': 1.0 / step})
  per_write = written[:]
  assert max(per_write) <= 2 * max(per_write[:5])  # The 200th write costs what the 1st did.
  assert len(reporting.read_metrics(path)['train/loss']) == 200  # Readable before close.
  writer.close()
  assert len(reporting.read_metrics(path)['train/loss']) == 200
  assert not glob.glob(path + '.part-*')


# ---------------------------------------------------------------------------
# Chaos: kills, a corrupted and a bit-flipped checkpoint, a full disk.
# ---------------------------------------------------------------------------
_CHAOS_FLAGS = ('--config.total_steps=120', '--config.checkpoint_every=10',
                '--config.evals.eval.every_steps=1000', '--config.log_every=10',
                '--config.warmup_steps=10')


def _newest_step(workdir):
  steps = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  return max(steps, default=None)


def _disk_full_limit():
  # Files may grow to 64 KiB: the first checkpoint's array files are larger, so its
  # save fails the way a full disk fails a write (EFBIG instead of ENOSPC).
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.slow
def test_chaos_kills_corruption_bitflip_and_full_disk_end_like_an_uninterrupted_run(tmp_path):
  reference = str(tmp_path / 'reference')
  result = _run_cli(*main_command(reference, *_CHAOS_FLAGS))
  assert result.returncode == 0, result.stderr[-3000:]

  workdir = str(tmp_path / 'chaos')
  rng = random.Random(11)
  command = main_command(workdir, *_CHAOS_FLAGS)
  events = ['kill'] * 20
  events.insert(6, 'corrupt')
  events.insert(12, 'bitflip')
  events.insert(3, 'disk_full')
  log = []
  for event in events:
    if event == 'disk_full':
      result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env=multidevice.subprocess_env(1), preexec_fn=_disk_full_limit,
                              timeout=600)
      assert result.returncode != 0  # It fails (cleanly or not) and the next run resumes.
      log.append(('disk_full', result.returncode))
      continue
    if event in ('corrupt', 'bitflip') and _newest_step(workdir):
      step_dir = os.path.join(workdir, 'checkpoints', str(_newest_step(workdir)))
      (_truncate if event == 'corrupt' else _flip_one_bit)(step_dir)
      log.append((event, step_dir))
      continue
    metrics = os.path.join(workdir, 'metrics.jsonl')
    size = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=multidevice.subprocess_env(1))
    if rng.random() < 0.3:  # During start-up, restore, compile.
      time.sleep(rng.uniform(2.0, 15.0))
    else:  # While training: steps, async saves, evaluation, the export.
      deadline = time.time() + 120
      while process.poll() is None and time.time() < deadline and not (
          os.path.exists(metrics) and os.path.getsize(metrics) > size):
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 4.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.append(('kill', _newest_step(workdir) if os.path.isdir(
        os.path.join(workdir, 'checkpoints')) else None))
  if os.path.exists(os.path.join(workdir, 'final.npz')):
    os.remove(os.path.join(workdir, 'final.npz'))  # Finished between kills: export again.
    os.remove(os.path.join(workdir, 'final.json'))
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '120'), ignore_errors=True)
  result = _run_cli(*command)
  print('chaos events:', log)
  assert result.returncode == 0, (log, result.stderr[-3000:])
  assert {'corrupt', 'bitflip'} <= {event for event, _ in log}, log  # Both really happened.
  assert os.listdir(os.path.join(workdir, checkpoint.MOVED_ASIDE_DIR)), log
  _assert_same_params(os.path.join(reference, 'final.npz'), os.path.join(workdir, 'final.npz'))
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    steps = [json.loads(line)['step'] for line in f if 'train/loss' in line]
  assert steps == sorted(set(steps)), log
