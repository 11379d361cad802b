"""The error the library raises on purpose for a failure that is not bad input: a run whose loss diverged, an
optional package that is not installed. Its message says what happened and what to do, so the CLI prints it as one
line (as it prints ValueError and FileNotFoundError); any other RuntimeError is a bug and keeps its traceback."""


class ResnetlabError(RuntimeError):
    """A failure resnetlab detects and explains; a RuntimeError, as these failures were before the class existed."""
