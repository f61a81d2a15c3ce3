"""User-facing errors: raised at the edges (config, data, files) with a message that names the cause.

The entry points catch `UserError` and print its message alone, so a user sees what is wrong and how
to fix it instead of a traceback from deep inside jax.
"""


class UserError(ValueError):
  """Bad input from the user: a config value, a data file, a path. The message says what and where."""


class ConfigError(UserError):
  """A config field has a bad value or an unknown key."""


class DataError(UserError):
  """A data file is missing, empty or malformed (the message names file, line and field)."""


class CheckpointError(UserError):
  """A checkpoint or export directory is missing, incomplete, or would be overwritten."""


class DivergedError(UserError):
  """Training produced a non-finite loss or gradient: the message names the step and the cause."""
