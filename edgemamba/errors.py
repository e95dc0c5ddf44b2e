"""The one error type users see. The CLI prints its message on one line and exits 2."""


class EdgeMambaError(Exception):
    """A user-facing error: bad input, a refused file, an unsupported model or target.

    The message says what was wrong and where (file, tensor, field). Internal bugs raise
    ordinary exceptions instead, so they keep their traceback.
    """
