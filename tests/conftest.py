"""Tests see 8 CPU devices, so data-parallel code runs as it would on a TPU host."""

import jax

jax.config.update('jax_num_cpu_devices', 8)
