"""The one error type of bad input data (its message names the file, the record and the field)."""


class DataError(ValueError):
    """Bad input data; the message names the file, the record and the field."""
