"""User-facing errors: bad input or config. The CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Base class: anything a user can fix by changing their input."""


class ConfigError(UserError, ValueError):
    """A bad setting; the message names the key."""


class DataError(UserError, ValueError):
    """Unreadable or malformed data."""


class ModelLoadError(UserError, RuntimeError):
    """Weights or tokenizer cannot be reached."""
