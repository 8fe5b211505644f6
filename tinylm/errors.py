"""The one error type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown key, a wrong type, a diverged run.

    The message is shown as one line, so it must name the cause (and the file or key) by itself.
    """
