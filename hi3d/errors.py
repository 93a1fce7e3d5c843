"""The one exception type users see: its message is printed as a single line by the CLI."""


class Hi3DError(Exception):
    """Bad input, missing files or weights, wrong config: a message that names the problem and the fix."""


class ConfigError(Hi3DError):
    """Unknown or misspelt config key, or a value of the wrong type."""
