"""Training speed on this machine: `python benchmarks/train_speed.py [--arch A] [--size 224] [--batch 16]`.

Prints the data-parallel train step's compile time and images/s (synthetic images, the full recipe),
then, with --proxy, one local-search child's proxy training split into compile, train and eval.
Last line: one JSON object.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import search as search_config  # noqa: E402
from configs import train as train_config  # noqa: E402
from mnasnet_jax import input_pipeline, platform, train  # noqa: E402


def step_speed(arch, size, batch, steps):
  config = train_config.get_config()
  config.batch_size = batch
  mesh = platform.data_mesh(jax.local_devices())
  model = train.create_model(config, arch, 1000)
  tx, schedule = train.create_optimizer(config, steps_per_epoch=1000)
  start = time.perf_counter()
  state = train.replicate(train.create_state(model, tx, size, True, 0), mesh)
  train_fn, _ = train._steps(config, model, tx, schedule, mesh)
  rng = np.random.default_rng(0)
  images, labels = train.shard_batch(mesh, rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                                     rng.integers(0, 1000, batch).astype(np.int32))
  train_fn = train_fn.lower(state, images, labels).compile()
  compile_seconds = time.perf_counter() - start
  state, metrics = train_fn(state, images, labels)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_fn(state, images, labels)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  return {'arch': arch, 'image_size': size, 'batch': batch, 'compile_seconds': compile_seconds,
          'step_seconds': seconds / steps, 'images_per_second': batch * steps / seconds,
          'devices': mesh.size, 'backend': jax.default_backend()}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--arch', default='mnasnet_a1')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--proxy', default='mobilenet_v2', help='child to proxy-train; "" skips it')
  args = parser.parse_args()
  result = {'train_step': step_speed(args.arch, args.size, args.batch, args.steps)}
  print(f'{args.arch} {args.size}px batch {args.batch}: compile '
        f'{result["train_step"]["compile_seconds"]:.1f} s, '
        f'{result["train_step"]["images_per_second"]:.1f} images/s')
  if args.proxy:
    config = search_config.get_config('local')
    data = input_pipeline.create_proxy_data(config.data)
    result['proxy'] = dict(train.proxy_train(config.proxy, args.proxy, data), arch=args.proxy)
    p = result['proxy']
    print(f'proxy child {args.proxy}: compile {p["compile_seconds"]:.1f} s, train '
          f'{p["train_seconds"]:.1f} s ({p["steps"]} steps), eval {p["eval_seconds"]:.1f} s, '
          f'held-out top-1 {p["accuracy"]:.3f}')
  result['load_average'] = os.getloadavg()
  print(json.dumps(result))


if __name__ == '__main__':
  main()
