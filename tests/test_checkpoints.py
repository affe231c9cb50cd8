import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp

from mnasnet_jax import checkpoints
from mnasnet_jax import platform


def test_a_replicated_state_saves_and_restores_compiling_nothing(tmp_path):
  """Orbax's replica-parallel save cuts each array on the device by a program compiled for its
  shape: on 8 devices, hundreds of compiles for a model's state. Here one device's copy writes each
  array, so saving compiles nothing."""
  mesh = platform.data_mesh(jax.devices())
  assert mesh.size == 8
  replicated = NamedSharding(mesh, P())
  state = {
    f'w{i}': jax.device_put(np.arange(i * 7 + 8, dtype=np.float32).reshape(-1, 1), replicated)
    for i in range(1, 9)
  }
  compiles = []
  listener = lambda event, *args, **kwargs: compiles.append(event)
  manager = checkpoints.manager(str(tmp_path), enable_async_checkpointing=False)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    manager.save(0, args=ocp.args.StandardSave(state))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert '/jax/core/compile/backend_compile_duration' not in compiles
  restored = manager.restore(0, args=ocp.args.StandardRestore(state))
  for name, value in state.items():
    np.testing.assert_array_equal(restored[name], value)
    assert restored[name].sharding == replicated
