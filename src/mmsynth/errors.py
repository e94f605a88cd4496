"""One exception type for bad user input, so the CLI can turn it into a one-line message and exit 2."""


class InputError(ValueError):
    """Raised when a user-supplied input (file, number, name, JSON) is invalid.

    The message names the input and says what would be valid; the CLI prints it without a traceback.
    """
