"""Errors a user can fix. The CLI prints their message as one line and exits 2, without a traceback."""


class UserError(Exception):
    """Bad input: the message names the input that was wrong and what would be right."""
