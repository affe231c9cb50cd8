"""Profiles the latency lookup table:
`python launch/main.py --config=configs/profile_latency.py[:ARG] --workdir=DIR`.

ARG: none (224 px, 1000 classes: `litert_cpu_224.json`) or `local` (32 px, 10 classes:
`litert_cpu_32.json`, the table of the local CPU search on Fashion-MNIST); `resolution=N` profiles
at N px (`litert_cpu_N.json`); `precision=int8` profiles every unit quantized as an int8 model is
(`litert_cpu_N_int8.json`). The layers come from the search space of `configs/search.py` with the
same `local` and `resolution`, plus the named architectures'.

`--config.recalibrate=TABLE` (a shipped name or a path) profiles no unit: it times a handful of whole
models on this job's backend (the named models and `recalibration.num_random` random ones), refits
TABLE's calibration to them and writes the table, recording where and when, to DIR (about a minute).
"""

import ml_collections
from ml_collections import config_dict

from mnasnet_jax import models
from mnasnet_jax.configs import common
from mnasnet_jax.configs import search


def get_config(arg=None):
  parsed = common.parse_arg(arg, local=False, resolution=(None, int), precision='float32')
  local = parsed.local
  config = ml_collections.ConfigDict()
  config.job = 'profile_latency'
  space_arg = f'local={local}' + (f',resolution={parsed.resolution}' if parsed.resolution else '')
  config.search_space = search.get_config(space_arg).search_space
  config.architectures = tuple(models.ARCHITECTURES)  # every named model
  config.resolution = common.image_size(parsed)
  config.num_classes = 10 if local else 1000
  config.precision = parsed.precision  # 'float32' or 'int8' (quantize.py)
  suffix = '' if parsed.precision == 'float32' else f'_{parsed.precision}'
  config.table_name = f'litert_cpu_{config.resolution}{suffix}.json'
  config.backend = 'litert'  # or 'adb' (a phone; see config.adb)
  # Each unit is timed in `instances` fresh interpreters, each `repeats` timed invokes after
  # `warmup` untimed ones; the table records these. Fresh interpreters are what make a minimum
  # repeatable (see LiteRTBackend). Units at 32 px take tens of microseconds, so more repeats cost
  # little there.
  config.instances = 5
  config.warmup = 10 if local else 3
  config.repeats = 40 if local else 10
  config.num_threads = 1  # a phone's single big core
  # litert: MiB of other data read before each timed invoke, so that a layer's weights are out of
  # the core's caches as inside a network (LiteRTBackend). Several times the core's own (L1 + L2)
  # cache; 16 fit whole networks best on a core with 2 MiB of L2 (64 also emptied part of the shared
  # L3). The adb backend's benchmark_model repeats back to back; a phone's caches hold little of a
  # model.
  config.flush_mib = 16.0
  # Each entry's statistic over the repeats: 'min', 'median' (litert only), 'mean'. The minimum is
  # the one that adds up to whole networks on a shared machine (see latency/profiler.py).
  config.statistic = 'min'
  config.log_every_seconds = 30.0
  # Recalibration of an existing table on the device at hand, instead of profiling one. The whole
  # models are timed as the table's entries were (its recorded timing), on this config's backend.
  config.recalibrate = config_dict.placeholder(str)  # a table's shipped name or path
  config.recalibration = ml_collections.ConfigDict()
  config.recalibration.num_random = 6  # random architectures of the table's space, beside the named
  config.recalibration.seed = 2  # not the validation's (0) nor the shipped fit's (1) sample
  # 'scale' refits the scale alone, keeping unit_ms (the interpreter's fixed cost per unit, fitted
  # on 30 models when the table was made); 'scale_and_unit' both, which a dozen timings on a
  # shared machine pin down poorly (measured: 11.1% against 12.9% MAPE on 56 other models).
  config.recalibration.fit = 'scale'
  config.adb = ml_collections.ConfigDict()
  config.adb.binary = 'adb'
  config.adb.serial = ''  # '' = the only device attached
  config.adb.device_dir = '/data/local/tmp/mnasnet_latency'
  config.adb.benchmark_binary = '/data/local/tmp/benchmark_model'
  config.adb.cpu_mask = 'f0'  # taskset mask of one big core (cores 4-7 on most big.LITTLE phones)
  return config
