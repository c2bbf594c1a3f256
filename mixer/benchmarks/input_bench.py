"""Host input throughput of the trainer's own pipeline, per CPU core.

Generates JPEGs of 500x375 (ImageNet's typical size) from scikit-learn's two
sample photos (random 500x375 crops of randomly rescaled copies) as an
`imagefolder:` dataset in a temp dir, then times
`input_pipeline.create_train_iterator` on it, i.e. exactly what a training run
executes (read, shuffle, decode, augment, batch, prefetch), in two settings:

  full: decode + Inception crop (5-100%) + flip + RandAugment(2, 15) + value
        range (the paper's ImageNet training preprocessing)
  bare: decode + resize + value range (no augmentation)

The encoded files are cached in RAM (config.input.cache_raw), so disk speed
does not count. Result: images/s and images/s per core (target: >= 120
images/s/core for `full`). Run: python -m mixer.benchmarks.run --benchmarks=input
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from mixer import config_lib, input_pipeline

TARGET_IMAGES_PER_SEC_PER_CORE = 120.0


def _write_jpegs(root: str, count: int) -> None:
  """`count` JPEGs as <root>/train/<class>/<i>.jpg, two classes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  photos = sk_datasets.load_sample_images().images  # Two 427x640 RGB photos.
  rng = np.random.RandomState(0)
  for i in range(count):
    photo = Image.fromarray(photos[i % len(photos)])
    scale = rng.uniform(1.0, 1.6)
    photo = photo.resize((int(photo.width * scale), int(photo.height * scale)))
    left = rng.randint(0, photo.width - 500 + 1)
    top = rng.randint(0, photo.height - 375 + 1)
    directory = os.path.join(root, 'train', f'class{i % 2}')
    os.makedirs(directory, exist_ok=True)
    photo.crop((left, top, left + 500, top + 375)).save(
        os.path.join(directory, f'{i:04d}.jpg'), quality=90)


def _config(root: str, image_size: int, batch_size: int, augment: bool):
  config = config_lib.base_config()
  config.update(dataset=f'imagefolder:{root}', train_split='train', num_classes=2,
                image_size=image_size, batch_size=batch_size)
  config.input.update(cache_raw=True, shuffle_buffer=256, inception_crop=augment,
                      flip=augment, randaug_layers=2, randaug_magnitude=15 if augment else 0)
  return config


def _rate(config, num_images: int) -> float:
  """Images/s over `num_images` images (after two warm-up batches).

  The pipeline keeps a few hundred images in flight (prefetch, parallel chunks),
  already done when the clock starts: `num_images` must be many times that.
  """
  iterator = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  for _ in range(2):  # Warm-up: tracing, file cache, thread start.
    next(iterator)
  steps = max(1, num_images // config.batch_size)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * config.batch_size / (time.perf_counter() - start)


def run(num_images: int = 3072, image_size: int = 224, batch_size: int = 64) -> dict:
  """Measures both settings; returns the JSON-able result."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  with tempfile.TemporaryDirectory() as root:
    _write_jpegs(root, 256)
    full = _rate(_config(root, image_size, batch_size, augment=True), num_images)
    bare = _rate(_config(root, image_size, batch_size, augment=False), num_images)
  return {
      'benchmark': 'input', 'image_size': image_size, 'batch_size': batch_size,
      'preprocessing': f'decode+inception_crop({image_size})+flip+randaug(2,15)+value_range',
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
  import json  # pylint: disable=g-import-not-at-top
  print(json.dumps(run()))
