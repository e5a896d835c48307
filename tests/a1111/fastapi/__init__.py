"""Minimal FastAPI stand-in: records routes so tests can find and call them.

Mirrors the parts of fastapi (0.94, A1111 1.10.1's pin) an A1111 extension touches:
`FastAPI.add_api_route(path, endpoint, methods=..., dependencies=..., **kwargs)` and the
`get/post/put/delete/api_route` decorators, `APIRouter`, `Depends`, `HTTPException(status_code,
detail, headers)`, `Request`, `Query`, `Body`. Nothing is served; `call()` runs a recorded
route the way a request would: dependencies first (an `HTTPException` from them aborts), then
the endpoint with the given keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class HTTPException(Exception):
    def __init__(self, status_code: int, detail: Any = None, headers: dict | None = None):
        super().__init__(status_code, detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers

    def __repr__(self):
        return f"HTTPException(status_code={self.status_code}, detail={self.detail!r})"


@dataclass
class Depends:
    dependency: Callable | None = None


def Query(default=None, **kwargs):  # noqa: N802 (fastapi's name)
    return default


def Body(default=None, **kwargs):  # noqa: N802
    return default


@dataclass
class Request:
    query_params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    json_body: Any = None

    async def json(self):
        return self.json_body


@dataclass
class Route:
    path: str
    endpoint: Callable
    methods: list[str]
    dependencies: list[Depends]
    kwargs: dict


class APIRouter:
    def __init__(self, *args, **kwargs):
        self.routes: list[Route] = []

    def add_api_route(self, path: str, endpoint: Callable, *, methods=None, dependencies=None, **kwargs):
        self.routes.append(Route(path, endpoint, [m.upper() for m in (methods or ["GET"])], list(dependencies or []), kwargs))

    def api_route(self, path: str, *, methods=None, **kwargs):
        def register(fn):
            self.add_api_route(path, fn, methods=methods, **kwargs)
            return fn
        return register

    def get(self, path: str, **kwargs):
        return self.api_route(path, methods=["GET"], **kwargs)

    def post(self, path: str, **kwargs):
        return self.api_route(path, methods=["POST"], **kwargs)

    def put(self, path: str, **kwargs):
        return self.api_route(path, methods=["PUT"], **kwargs)

    def delete(self, path: str, **kwargs):
        return self.api_route(path, methods=["DELETE"], **kwargs)

    def include_router(self, router: "APIRouter", prefix: str = "", **kwargs):
        for r in router.routes:
            self.routes.append(Route(prefix + r.path, r.endpoint, r.methods, r.dependencies, r.kwargs))

    def find(self, method: str, path: str) -> Route:
        for r in self.routes:
            if r.path == path and method.upper() in r.methods:
                return r
        raise HTTPException(status_code=404, detail="Not Found")

    def call(self, method: str, path: str, *, credentials=None, **params):
        """Run a route as a request would: its dependencies (given `credentials` when they
        take them, e.g. A1111's `Api.auth`), then the endpoint with `params`."""
        route = self.find(method, path)
        for dep in route.dependencies:
            if credentials is None:
                raise HTTPException(status_code=401, detail="Not authenticated", headers={"WWW-Authenticate": "Basic"})
            dep.dependency(credentials)
        return route.endpoint(**params)


class FastAPI(APIRouter):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.middleware_stack: list = []

    def middleware(self, kind: str):
        def register(fn):
            self.middleware_stack.append(fn)
            return fn
        return register

    def add_middleware(self, *args, **kwargs):
        self.middleware_stack.append((args, kwargs))
