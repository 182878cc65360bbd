"""Opening the Dagster instance safely when several `foundry` commands start at once.

Creating a new sqlite instance stamps each database's schema version; two processes doing it
at the same moment both stamp it, and Alembic then refuses to open the instance ever after
("more than one head present"). Opening under an exclusive lock in DAGSTER_HOME makes the
first process create it and the others find it made.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dagster import DagsterInstance

LOCK_FILE = ".foundry-instance.lock"


def open_instance() -> DagsterInstance:
    """DagsterInstance.get() for $DAGSTER_HOME (which must be set), one creator at a time."""
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return DagsterInstance.get()
