"""Errors meant for users: one line, what is wrong, which file, what to do.

Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, bad input data)."""


class ConfigError(UserError):
    """A config file or a --set override is wrong."""


class BadInputError(UserError):
    """One item of a data set (an image, an annotation, a split file) is unusable."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep (path, problem) across dask.distributed's pickling
        return (type(self), (self.path, self.problem))
