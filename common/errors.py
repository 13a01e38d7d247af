"""The one exception type for bad input data, kept apart so every data module can raise it."""


class DataError(ValueError):
    """Input data is missing, unreadable or unusable; the message is one line meant for the user."""
