"""Notices and warnings on stderr: `openelm: ...` says what a run chose for the user (the demo
model, a fallback prompt, a truncated prompt), `openelm: warning: ...` that something may be wrong.

Code anywhere in the package logs them (`logging.getLogger(__name__).info(...)` or `.warning(...)`,
under the `openelm_mlx` logger); the CLI shows them (`show_notices`), and `--quiet` keeps only the
warnings. A Python caller of the library sees the warnings (logging's last resort) and no notices,
unless it configures logging itself. Errors are not notices: they are raised (errors.OpenELMError).
"""

import logging
import sys

LOGGER = logging.getLogger("openelm_mlx")


class _Stderr(logging.Handler):
    """Each line to sys.stderr as it is when the line is written (a test's captured stream)."""

    def emit(self, record: logging.LogRecord):
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        print(f"openelm: {kind}{record.getMessage()}", file=sys.stderr)


def show_notices(quiet: bool):
    """Print the package's notices (unless quiet) and warnings on stderr, as `openelm: ...` and
    `openelm: warning: ...`. Called by the CLI once per command, after its options are read."""
    LOGGER.handlers = [_Stderr()]
    LOGGER.setLevel(logging.WARNING if quiet else logging.INFO)
    LOGGER.propagate = False  # the root logger's handlers (lm-eval's, a caller's) would print them twice
