"""The errors the library raises on purpose for a failure that is not bad input: a run whose loss diverged, an
optional package that is not installed, a run stopped by Ctrl-C. Each message says what happened and what to do, so
the CLI prints it as one line (as it prints ValueError and FileNotFoundError); any other RuntimeError is a bug and
keeps its traceback."""


class ResnetlabError(RuntimeError):
    """A failure resnetlab detects and explains; a RuntimeError, as these failures were before the class existed."""


class RunStopped(ResnetlabError):
    """A run stopped by a signal after saving the iteration it had reached; the command exits with 128 + signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message, signal_number)
        self.signal_number = signal_number

    def __str__(self) -> str:
        return self.args[0]
