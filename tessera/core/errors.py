"""Which errors a retry can cure.

Bad input, a missing file, a bad config or a missing model fail the same way every time: retrying
them only repeats the failure (and its traceback) and delays the one line that says what to fix.
Lost connections, timeouts, a dead worker or a full disk may pass: those are retried.
"""
from __future__ import annotations

from tessera.config import ConfigError

# FileNotFoundError covers a missing model (tessera.models.fetch.ModelMissing); ValueError covers
# bad input (InputError, pyarrow's ArrowInvalid, undecodable text) and invalid values.
PERMANENT: tuple[type[BaseException], ...] = (
    ConfigError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
    ValueError, TypeError, KeyError, ImportError, NotImplementedError,
)


def is_permanent(error: BaseException) -> bool:
    """Whether `error` (or, for a Ray task error, the worker's exception) cannot succeed on a retry."""
    cause = getattr(error, "cause", None) or error
    return isinstance(cause, PERMANENT)
