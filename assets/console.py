"""A compact console logger for runs: `  demo/checkpoint │ step 100/250 | loss 6.83`.

Dagster's default console lines carry a timestamp, job name, run id and step key before the
message; during `foundry sync` that buries the progress a user wants to watch. Framework events
(step started, output handled, ...) are left to the event log and the UI.
"""

from __future__ import annotations

import logging
import sys

from dagster import Field, InitLoggerContext, logger


class _CompactFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        step = (meta.get("step_key") or "").replace("__", "/")
        message = meta.get("orig_message") or record.getMessage()
        prefix = f"  {step} │ " if step else "  "
        return prefix + message


class _UserMessagesOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        if event is None:
            return True  # context.log messages and Pipes logs from subprocesses
        return event.is_failure or event.event_type_value in ("STEP_FAILURE", "RUN_FAILURE")


@logger(
    config_schema={"log_level": Field(str, is_required=False, default_value="INFO")},
    description="Compact console output: one line per message, prefixed by the asset.",
)
def compact_console(init_context: InitLoggerContext) -> logging.Logger:
    log = logging.Logger("foundry", level=init_context.logger_config["log_level"])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CompactFormatter())
    handler.addFilter(_UserMessagesOnly())
    log.addHandler(handler)
    return log
