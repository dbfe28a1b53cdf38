"""SQLite persistence (WAL): services, revisions, IAM policies. The only place SQL lives.

Bodies are stored as the Knative JSON the API serves, so what a client wrote is what it
reads back. Every write bumps one global resourceVersion counter, which the API uses for
optimistic concurrency (409 on a stale PUT).
"""

from cloudlet.store.sqlite import Record, Store

__all__ = ["Record", "Store"]
