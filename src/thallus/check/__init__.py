"""``thallus check``: a scanner that grades an HTTP API's security layers from outside.

It probes one origin with a bounded, fixed plan of safe requests (:mod:`thallus.check.scan`) and
judges the answers layer by layer — headers, CORS, CSRF, correlation ID, errors, cookies — as
docs/design.md §3–§8 describe them, with Mozilla's HTTP Observatory's header tests where they
overlap (docs/check.md). It needs the ``check`` extra (httpx, Rich), imported only when scanning.
"""
