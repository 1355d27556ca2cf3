"""The one exception type that the command-line entry points print as a single line."""


class CollideError(Exception):
    """A user-facing error: the message names the offending input and the fix.

    Entry points print ``collide: error: <message>`` with no traceback and exit with status 2.
    """
