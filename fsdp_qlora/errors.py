"""The error types every layer raises; a leaf module (imports nothing of the package)."""


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2, before any expensive work."""


# EX_IOERR from sysexits.h: a checkpoint could not be written (e.g. the disk is full).
EXIT_CHECKPOINT_WRITE = 74


class CheckpointWriteError(Exception):
    """A checkpoint could not be written: nothing of it was kept, the previous one is intact.
    Reported as one line with exit code `EXIT_CHECKPOINT_WRITE` (docs/troubleshooting.md)."""

    exit_code = EXIT_CHECKPOINT_WRITE
