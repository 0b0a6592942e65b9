"""The error type for a user's mistake (a config key, a file, a data set), as opposed to a bug.

`avllm` and `scripts/*.py` print a `UserError` as one line (key or file, what is wrong, what to
do) and exit with code 2; anything else keeps its traceback. `--debug` or HYDRA_FULL_ERROR=1
shows the traceback of a `UserError` too. It is a `ValueError`, so callers that catch
`ValueError` keep working."""


class UserError(ValueError):
    """A mistake the user can fix; the message names the key or file and says what to do."""
