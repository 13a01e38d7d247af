"""The exception types meant for the user (one line each), kept apart so every module can raise them."""


class DataError(ValueError):
    """Input data is missing, unreadable or unusable; the message is one line meant for the user."""


class NoProgressError(RuntimeError):
    """A run stopped making progress (no round could be aggregated); the message says why."""
