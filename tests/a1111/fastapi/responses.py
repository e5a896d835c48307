"""fastapi.responses stand-in."""

from __future__ import annotations

from typing import Any


class JSONResponse:
    def __init__(self, content: Any = None, status_code: int = 200, headers: dict | None = None):
        self.content, self.status_code, self.headers = content, status_code, headers or {}


class Response(JSONResponse):
    pass
