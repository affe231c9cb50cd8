"""The one exception type for mistakes in a user's input.

A value on the command line, a config key, a block string, a latency table file or a missing
dataset is something the user can fix; the launcher prints these as one line, `error: <message>`,
naming the value and what was expected. Every other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A mistake in the user's input (flags, config, files); its message names the bad value."""
