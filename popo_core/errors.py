"""User-facing errors: bad input or config. The CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Base class: anything a user can fix by changing their input."""


class ConfigError(UserError, ValueError):
    """A bad setting; the message names the key."""


class DataError(UserError, ValueError):
    """Unreadable or malformed data."""


class ModelLoadError(UserError, RuntimeError):
    """Weights or tokenizer cannot be reached."""


def first_line(err: BaseException, lines: int = 1) -> str:
    """An exception's message cut to its first non-empty line (or `lines` of them, joined), or its
    type's name when it has none: how every one-line error of popo reads a library's exception."""
    text = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " ".join(text[:lines]) if text else type(err).__name__
