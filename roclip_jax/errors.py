"""Errors every layer may raise; the bottom of the import graph."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and a fix."""


def config_error(field: str, problem: str, fix: str) -> ConfigError:
  """`ConfigError("config.<field>: <problem> Fix: <fix>")`, the form every config check uses."""
  return ConfigError(f"config.{field}: {problem} Fix: {fix}")
