"""User-facing errors.

Everything that is the user's fault (a missing path, a corrupt image, an unknown dataset, a bad option) raises
:class:`LtddError` with one line naming the problem. The CLI prints that line on stderr and exits with code 2.
"""


class LtddError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
