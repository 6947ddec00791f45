"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MoyuError(Exception):
    """A user-facing problem: the message names the problem and the fix, in one line."""
