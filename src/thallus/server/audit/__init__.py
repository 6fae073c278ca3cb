"""The audit log's persistence: the hash chain, the store, the batching writer and its spill journal
(docs/design.md §11). The events themselves and the request-audit layer are the layers' (:mod:`thallus.audit`)."""
