"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MinikvError(Exception):
    """A user-facing error: bad input, missing files, settings that cannot work."""


class ContextFull(MinikvError):
    """The KV store has no room for the tokens being appended."""
