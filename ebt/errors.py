"""Errors a user can act on. The CLI prints their message and exits with status 2 (no traceback)."""


def first_line(e: BaseException) -> str:
    """A one-line account of an exception, whatever a library raised (messages may span lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class EBTError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(EBTError):
    """A configuration that cannot work (unknown size, mismatched vocabulary, context too long...)."""


class DataError(EBTError):
    """Missing, corrupt or inconsistent data (shards, manifests, source packages)."""


class CheckpointError(EBTError):
    """A checkpoint that is missing, corrupt, from another model, or could not be written."""
