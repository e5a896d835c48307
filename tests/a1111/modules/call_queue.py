"""Mirrors modules/call_queue.py: `queue_lock` (the lock every generation/model route holds)."""

import threading
from functools import wraps

queue_lock = threading.Lock()


def wrap_queued_call(func):
    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f
