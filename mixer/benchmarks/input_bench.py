"""Host input throughput: the full training preprocessing at 224px, per CPU core.

Generates 256 JPEGs of 500x375 (ImageNet's typical size) from scikit-learn's
two sample photos (random 500x375 crops of randomly rescaled copies) in a temp
dir, then times, through tf.data on all CPUs available to the process:

  full: read, decode_and_inception_crop(224), flip, RandAugment(2, 15),
        value_range, batch 64      (the paper's ImageNet training preprocessing)
  bare: read, decode, resize(224), value_range, batch 64

and prints one JSON line with images/s and images/s per core (target:
>= 120 images/s/core for `full`). Run: python -m mixer.benchmarks.input_bench
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from mixer import preprocess_ops as ops

TARGET_IMAGES_PER_SEC_PER_CORE = 120.0
_SIZE = 224
_BATCH = 64


def _write_jpegs(directory: str, count: int) -> list[str]:
  from PIL import Image
  from sklearn import datasets as sk_datasets

  photos = sk_datasets.load_sample_images().images  # Two 427x640 RGB photos.
  rng = np.random.RandomState(0)
  paths = []
  for i in range(count):
    photo = Image.fromarray(photos[i % len(photos)])
    scale = rng.uniform(1.0, 1.6)
    photo = photo.resize((int(photo.width * scale), int(photo.height * scale)))
    left = rng.randint(0, photo.width - 500 + 1)
    top = rng.randint(0, photo.height - 375 + 1)
    path = os.path.join(directory, f'{i:04d}.jpg')
    photo.crop((left, top, left + 500, top + 375)).save(path, quality=90)
    paths.append(path)
  return paths


def _full(data, index):
  crop_seed, flip_seed, randaug_seed = tf.unstack(ops.split_seed(ops.example_seed(0, index), 3))
  image = ops.decode_and_inception_crop(data, crop_seed, _SIZE)
  image = ops.flip_left_right(image, flip_seed)
  image = ops.randaugment(image, randaug_seed, 2, 15)
  return ops.value_range(image)


def _bare(data, index):
  del index
  return ops.value_range(ops.resize(ops.decode(data), _SIZE))


def _rate(paths, fn, num_images: int) -> float:
  """Images/s of `fn` over `num_images` images (after a warm-up batch)."""
  files = tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file).cache()
  ds = tf.data.Dataset.zip(files.repeat(), tf.data.Dataset.range(1 << 62))
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(_BATCH).prefetch(2)
  iterator = iter(ds)
  for _ in range(2):  # Warm-up: tracing, file cache, thread start.
    next(iterator)
  steps = max(1, num_images // _BATCH)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * _BATCH / (time.perf_counter() - start)


def run(num_images: int = 1024) -> dict:
  """Measures both rates; returns the JSON-able result."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  with tempfile.TemporaryDirectory() as directory:
    paths = _write_jpegs(directory, 256)
    full = _rate(paths, _full, num_images)
    bare = _rate(paths, _bare, num_images)
  return {
      'benchmark': 'input_pipeline',
      'preprocessing': 'decode+inception_crop(224)+flip+randaug(2,15)+value_range',
      'image_source': '256 JPEGs 500x375 from sklearn sample photos',
      'cores': cores,
      'images_per_sec': round(full, 1),
      'images_per_sec_per_core': round(full / cores, 1),
      'bare_decode_resize_images_per_sec': round(bare, 1),
      'bare_decode_resize_images_per_sec_per_core': round(bare / cores, 1),
      'target_images_per_sec_per_core': TARGET_IMAGES_PER_SEC_PER_CORE,
      'meets_target': full / cores >= TARGET_IMAGES_PER_SEC_PER_CORE,
  }


if __name__ == '__main__':
  print(json.dumps(run()))
