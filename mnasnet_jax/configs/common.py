"""The one parser of the `ARG` in `--config=FILE:ARG`, in big_vision's form (configs/common.py).

`ARG` is comma-separated `key=value` items, a bare key meaning True: `configs/search.py:local`,
`configs/search.py:local,resolution=64`. Each config names the keys it takes with their defaults, so
a misspelt or unknown key is refused in one line instead of silently ignored.
"""

import ml_collections

from mnasnet_jax import errors

_BOOLEANS = {'true': True, 'false': False}
_KINDS = {bool: 'true or false', int: 'a whole number', float: 'a number', str: 'a string'}


def parse_arg(arg, **spec) -> ml_collections.ConfigDict:
  """`arg` as a ConfigDict of the keys in `spec`; each spec value is a default whose type converts
  the given string, or a (default, type) pair when the default is None.

  parse_arg('local,resolution=64', local=False, resolution=(None, int))
    -> ConfigDict(local=True, resolution=64)
  """
  defaults = {k: v if isinstance(v, tuple) else (v, type(v)) for k, v in spec.items()}
  parsed = ml_collections.ConfigDict({k: default for k, (default, _) in defaults.items()})
  for item in filter(None, (arg or '').split(',')):
    key, has_value, text = item.partition('=')
    if key not in defaults:
      expected = f'one of {", ".join(defaults)}' if defaults else 'no argument'
      raise errors.UserError(f'unknown config argument {key!r}: expected {expected}')
    kind = defaults[key][1]
    try:
      if kind is bool:
        parsed[key] = _BOOLEANS[text.lower()] if has_value else True
      else:
        parsed[key] = kind(text)
    except (KeyError, ValueError):
      raise errors.UserError(
        f'config argument {item!r}: expected {_KINDS[kind]} for {key}'
      ) from None
  return parsed


def parse_local_arg(arg) -> ml_collections.ConfigDict:
  """The ARG of the search, train, export and profile_latency configs: `local` (Fashion-MNIST on
  this CPU instead of ImageNet) and `resolution=N` (the image size)."""
  return parse_arg(arg, local=False, resolution=(None, int))


def image_size(arg) -> int:
  """The image size `parse_local_arg(...)` asks for: its resolution, else the dataset's usual one
  (Fashion-MNIST padded to 32 px locally, ImageNet at 224)."""
  if arg.resolution is None:
    return 32 if arg.local else 224
  if arg.resolution < 1:
    raise errors.UserError(
      f'config argument resolution={arg.resolution}: expected a positive image size in pixels'
    )
  return arg.resolution
