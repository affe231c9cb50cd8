"""Latency from a lookup table profiled once per device (paper section 4): export, profile, predict."""

from mnasnet_jax.latency.export import export_tflite
from mnasnet_jax.latency.table import LatencyTable
from mnasnet_jax.latency.table import layer_key
from mnasnet_jax.latency.table import shipped_table

__all__ = ['LatencyTable', 'export_tflite', 'layer_key', 'shipped_table']
