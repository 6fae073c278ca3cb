"""What ``thallus serve`` hands to uvicorn, in every worker: JSON logging, then the reference API."""

from __future__ import annotations

import gc

from thallus.logs import configure_logging
from thallus.server.api import Service, create_app
from thallus.server.settings import ServiceSettings


def serve_factory() -> Service:
    settings = ServiceSettings.load()
    configure_logging(settings.log_level)
    service = create_app(settings)
    # Everything imported and built so far lives as long as the process. Left in the collector's
    # generations, every full collection walks it again — ~200,000 objects, 60–130 ms on the
    # benchmark machine, each one a pause every request in flight waits out (the p99 tail of
    # benchmarks/bench_service.py). Collect once, then freeze it out of future collections.
    gc.collect()
    gc.freeze()
    return service
