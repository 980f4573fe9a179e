"""User-facing errors: one clear sentence naming the problem and the fix.

The CLI catches UserError, prints its message (no traceback) and exits with code 2.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown name, bad config value...)."""

    exit_code = 2


class NonFiniteLossError(UserError):
    """A loss became NaN or infinite; the trainer stops before writing a corrupt checkpoint."""
