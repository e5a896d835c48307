"""Mirrors modules/errors.py: `report(message, *, exc_info=False)` prints "*** message" (and the
traceback) to stderr and records the exception; `display(e, task)`, `record_exception()`.

Stand-in addition: every report is kept in `reports` (message, the exception being handled or
None) so tests can assert that an error was reported and swallowed."""

from __future__ import annotations

import sys
import textwrap
import traceback
from dataclasses import dataclass

exception_records: list[dict] = []


@dataclass
class Report:
    message: str
    exception: BaseException | None
    traceback: str


reports: list[Report] = []


def record_exception():
    _, e, tb = sys.exc_info()
    if e is None:
        return
    if exception_records and exception_records[-1].get("exception") == str(e):
        return
    exception_records.append({"exception": str(e), "traceback": traceback.format_tb(tb)})
    if len(exception_records) > 5:
        exception_records.pop(0)


def report(message: str, *, exc_info: bool = False) -> None:
    record_exception()
    exc = sys.exc_info()[1]
    tb = traceback.format_exc() if exc_info and exc is not None else ""
    reports.append(Report(message, exc, tb))
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    record_exception()
    reports.append(Report(f"{task or 'error'}: {type(e).__name__}", e, "".join(traceback.format_exception(e))))
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    print(*traceback.TracebackException.from_exception(e).format(), sep="", file=sys.stderr)


already_displayed = {}


def display_once(e: Exception, task):
    record_exception()
    if task in already_displayed:
        return
    display(e, task)
    already_displayed[task] = 1


def print_error_explanation(message):
    record_exception()
    print(message.strip(), file=sys.stderr)
