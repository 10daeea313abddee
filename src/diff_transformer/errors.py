"""Errors the user can fix: the CLI prints them on one line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user. The message names the problem and the fix."""
