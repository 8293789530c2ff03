"""Errors raised for bad data files."""


class DataError(ValueError):
    """A data file or data set is unusable. The message names the file and, where it applies,
    the column."""
