"""Gates for tasks that must wait for the test: a file that the test creates.

A gated task gives up waiting after ``GATE_LIMIT`` seconds, so nothing hangs forever.
Module-level functions, so that they travel to process workers by reference.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

GATE_LIMIT = 60


def open_gate(path):
    Path(path).touch()


def wait_gate(path, limit=GATE_LIMIT):
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
