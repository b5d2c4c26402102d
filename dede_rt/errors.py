"""Errors a user can fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the user's input (missing file, wrong format, bad option)."""


class IntegrityError(UserError):
    """An artifact does not match what its manifest records (hash, shape, version)."""
