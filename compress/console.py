"""A console a user can read: library chatter goes to compress's DEBUG level, not the terminal.

Libraries print things a compress user cannot act on — bitsandbytes' "Failed to load CPU
gemm_4bit_forward from kernels-community", transformers' deprecation FutureWarnings raised from
inside peft, "Loading weights" / "Writing model shards" progress bars between compress's own lines.
They are re-logged on the `compress.libraries` logger at DEBUG, so they stay off the console but
reach any handler that listens at that level (a run's log file, or the console under --debug).
"""

from __future__ import annotations

import logging

# Loggers whose records are for the library's developers rather than for a compress user.
LIBRARY_LOGGERS = ("transformers", "bitsandbytes", "accelerate", "peft", "datasets", "huggingface_hub",
                   "torchao", "py.warnings")


class _ToDebug(logging.Handler):
    """Re-log a library's record at DEBUG on compress's own logger, naming where it came from."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's malformed record must not break the run
            message = str(record.msg)
        logging.getLogger("compress.libraries").debug("%s: %s", record.name, message.strip())


def route_library_output() -> None:
    """Send library warnings and Python warnings to compress's DEBUG level; turn off their progress bars.

    Called once at CLI start-up. transformers and datasets attach their own stderr handlers when
    imported, so they are imported first and then re-routed; bitsandbytes is not imported here, and
    its logger is routed before a run imports it (its kernel notice is logged at import). Idempotent.
    """
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # also turns off huggingface_hub's bars
    datasets.disable_progress_bars()
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [_ToDebug()]
        logger.propagate = False
        logger.setLevel(logging.WARNING)  # their INFO/DEBUG is noise even at compress's DEBUG
    # Its own level, so the records are made even when compress logs at INFO: console handlers
    # (set to INFO/WARNING) drop them, a DEBUG handler such as a run's log file keeps them.
    logging.getLogger("compress.libraries").setLevel(logging.DEBUG)
