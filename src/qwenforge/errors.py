"""The one exception type for user errors; its message is the line the CLI prints."""


class QwenforgeError(Exception):
    """A problem with the user's input or environment, not a bug: printed as one line, exit code 2."""
