"""The errors we expect and explain. `run.py` prints their message as one line, no traceback."""


class Error(Exception):
    """Bad input: a config, flag, file or data set the user can fix. Exit code 2."""

    exit_code = 2


class RunFailure(Error):
    """The run started but cannot go on (non-finite loss, failed save). Exit code 1."""

    exit_code = 1


def first_line(e: BaseException, *, with_type: bool = False, limit: int = None) -> str:
    """A library's exception as one line for an Error's message: its message's first line (its
    type's name when it has none), after the type with `with_type`, cut at `limit` characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if with_type:
        line = f"{type(e).__name__}: {line}"
    elif not line:
        line = type(e).__name__
    return line if limit is None or len(line) <= limit else line[:limit] + "..."
