"""Errors shown to users without a traceback (the CLI prints them and exits with status 2)."""


class UserError(Exception):
    """An error caused by the user's input: a bad flag, config, file or artifact."""
