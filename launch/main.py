"""Entry point: `python launch/main.py --config=configs/search.py[:ARG] --workdir=DIR [--config.X=Y]`.

The same command as `python -m mnasnet_jax.main` (mnasnet_jax/main.py, where the jobs and flags are).
"""

from mnasnet_jax import main

if __name__ == '__main__':
  main.run()
