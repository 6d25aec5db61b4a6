"""thawed HTTP server: OpenAI- and TGI-compatible API over a lazily decoded checkpoint.

``create_app(Settings(...))`` builds the FastAPI app; ``thawed serve CKPT`` runs it with uvicorn.
"""

from .app import create_app
from .settings import Settings

__all__ = ["create_app", "Settings"]
