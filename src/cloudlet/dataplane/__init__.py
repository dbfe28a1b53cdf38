"""The data plane: the router and activator between clients and container instances.

It owns the request path only: the Host header picks a service and, by traffic weights, a
revision (``routing``); the revision's activator hands out concurrency slots on its ready
instances and queues requests while none is free (``activator``); the proxy streams each
request to an instance over a keep-alive pool and the response back (``proxy``).

Rules: no container engine and no SQL here. The autoscaler drives the data plane only
through ``RevisionEndpoint`` (add, drain and remove instances; read its load samples), and
the control plane only through ``RoutingTable``. The hot path is callback style on
asyncio protocols with httptools parsers: no task or coroutine per request.
"""

from cloudlet.dataplane.activator import Backend, RevisionEndpoint, Ticket, pick_backend
from cloudlet.dataplane.proxy import Router, RouterSettings, start_router
from cloudlet.dataplane.routing import RequestRecord, RoutingTable, ServiceRoute, pick_weighted

__all__ = [
    "Backend",
    "RequestRecord",
    "RevisionEndpoint",
    "Router",
    "RouterSettings",
    "RoutingTable",
    "ServiceRoute",
    "Ticket",
    "pick_backend",
    "pick_weighted",
    "start_router",
]
