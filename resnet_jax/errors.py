"""The errors we expect and explain. `run.py` prints their message as one line, no traceback."""


class Error(Exception):
    """Bad input: a config, flag, file or data set the user can fix. Exit code 2."""

    exit_code = 2


class RunFailure(Error):
    """The run started but cannot go on (non-finite loss, failed save). Exit code 1."""

    exit_code = 1
