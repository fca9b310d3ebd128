"""The one exception type the runtime raises for bad input: CLIs turn it into one line."""


class MraError(Exception):
    """A problem the user can fix; the message says what, where and how."""
