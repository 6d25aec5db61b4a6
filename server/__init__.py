"""thawed HTTP server: OpenAI- and TGI-compatible API over a lazily decoded checkpoint.

``create_app(Settings(...))`` builds the FastAPI app; ``thawed serve CKPT`` runs it with uvicorn.
Both names load on first use, so the CLI's other commands (``generate``, ``eval``, ...) do not
import FastAPI and the server stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .settings import Settings

__all__ = ["create_app", "Settings"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(f"module 'thawed.server' has no attribute {name!r}")
