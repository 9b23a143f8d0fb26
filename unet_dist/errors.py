"""The one exception type for a user's mistake.

The CLI turns a `UserError` into one line on stderr and exit code 2; anything else is a fault and
keeps its traceback. The message names the file or key and the problem.
"""


class UserError(Exception):
    """A mistake in the user's input (file, config key, argument), not a bug."""
