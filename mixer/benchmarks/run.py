"""`make bench`: every benchmark, one JSON line each, plus `bench_results.jsonl`.

  input_pipeline  host preprocessing rate, images/s per CPU core (target >= 120)
  train_step      update throughput and compiled memory per device of the
                  trainer's real step (CPU default: Mixer-S/32 at 224, batch 16;
                  run `python -m mixer.benchmarks.train_bench --model=Mixer-B_16
                  --batch_size=256 --dtype=bfloat16` on an accelerator)

Figures vary with the machine and its load; compare runs on the same machine.
"""

import json

from mixer.benchmarks import input_bench, train_bench

RESULTS_FILE = 'bench_results.jsonl'


def main():
  results = [input_bench.run(), train_bench.run()]
  with open(RESULTS_FILE, 'w', encoding='utf-8') as f:
    for result in results:
      line = json.dumps(result)
      print(line)
      f.write(line + '\n')


if __name__ == '__main__':
  main()
