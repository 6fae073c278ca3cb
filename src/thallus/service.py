"""What ``thallus serve`` hands to uvicorn, in every worker: JSON logging, then the reference API."""

from __future__ import annotations

from thallus.api import Service, create_app
from thallus.logs import configure_logging
from thallus.settings import Settings


def serve_factory() -> Service:
    settings = Settings.load()
    configure_logging(settings.log_level)
    return create_app(settings)
