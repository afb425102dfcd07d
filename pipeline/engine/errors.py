"""Errors meant for users: one line, what is wrong, which file, what to do.

Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, bad input data)."""


class ConfigError(UserError):
    """A config file or a --set override is wrong."""


class FileProblem(UserError):
    """Something wrong with one file: its path and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep (path, problem) across dask.distributed's pickling
        return (type(self), (self.path, self.problem))


class BadInputError(FileProblem):
    """One item of a data set (an image, an annotation, a mask) is unusable: with on_bad_input skip it is
    left out."""


class DataSetError(FileProblem):
    """The data set as a whole is unusable (no data folder, a missing or malformed split file, a split with
    nothing to learn from): leaving items out cannot help."""
