"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine.

``protocol`` holds the request schemas and the error body, ``responses`` the response and
stream-chunk formats, ``app`` the routes, limits and the server that runs them.

Example:
    >>> from jaxserve.server import ServerConfig, serve                                     # doctest: +SKIP
    >>> serve("/models/Qwen2.5-0.5B-Instruct", EngineConfig(dtype="bfloat16"), ServerConfig(api_key="k"))  # doctest: +SKIP
"""

from jaxserve.server.app import ServerConfig, build_server, create_app, serve
from jaxserve.server.protocol import APIError

__all__ = ["APIError", "ServerConfig", "build_server", "create_app", "serve"]
