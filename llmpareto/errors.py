"""Errors a user can act on.

A UserError is printed by the CLI as one clear message (what was wrong, which flag or file,
what to do) instead of a traceback.
"""


class UserError(Exception):
    """Bad input or an unusable setting; the message says what to do about it."""
