"""The one exception type for mistakes in a user's input (config, data files, names).

The CLI turns it into a single error line and exit code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(ValueError):
    """Bad input that the user can fix; the message says what is wrong and how to fix it."""
