"""The path `--config=` takes (ml_collections loads a file); the config is in the package:
mnasnet_jax/configs/detection.py."""

from mnasnet_jax.configs.detection import get_config  # noqa: F401
