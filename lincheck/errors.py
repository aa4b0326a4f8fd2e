"""lincheck's exceptions. A gradient that is wrong is a result, never an exception."""


class LincheckError(Exception):
    """Input lincheck cannot check: an unreadable file, a malformed or inconsistent array."""


class InputError(LincheckError, ValueError):
    """An input array or file is malformed; the message names it and says what is wrong."""
