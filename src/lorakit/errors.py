"""User-facing errors.

Anything the user can fix (a config key, a data row, a model path, a CLI flag) raises
`LorakitError` with a message that names the bad value and the way out. The CLI prints
it as one line per problem and exits with code 2, never a traceback. Everything else is
a bug in lorakit and keeps its traceback.
"""

from __future__ import annotations


class LorakitError(Exception):
    """An error caused by user input; `str(err)` is what the user sees."""

    exit_code = 2


class ConfigError(LorakitError):
    """One or more problems in a config file or its overrides, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(LorakitError):
    """A problem in a dataset file: names the file and, where known, the row."""
