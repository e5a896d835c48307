"""fastapi.security stand-in: HTTP Basic credentials as A1111's `Api.auth` receives them."""

from __future__ import annotations

from dataclasses import dataclass


class HTTPBasic:
    def __init__(self, *args, **kwargs):
        pass


@dataclass
class HTTPBasicCredentials:
    username: str
    password: str
