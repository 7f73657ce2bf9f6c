"""``winnow serve``: an OpenAI-compatible server for policy models and reward models.

``protocol`` holds the wire models, ``serving`` the engine side (no web framework), ``app`` the
routes and :func:`run_server`. Nothing heavy is imported here.
"""

from __future__ import annotations

__all__ = ["run_server"]


def run_server(config):
    """Serve ``config.model`` until SIGTERM/SIGINT (see :func:`winnow.serve.app.run_server`)."""
    from winnow.serve.app import run_server as run

    return run(config)
