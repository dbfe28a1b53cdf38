"""The data plane: the router and activator between clients and container instances.

It owns the request path only. The Host header picks a service and, by traffic weights, a
revision (``routing``); the revision's activator hands out concurrency slots on its ready
instances and queues requests while none is free (``activator``); the client protocol
parses requests (``client``, with the uncommon cases in ``request``), and an ``Exchange``
(``exchange``) streams each one to an instance over a keep-alive ``UpstreamConnection``
(``upstream``) and the response back. ``proxy`` holds the settings, the listening socket
and the timeout sweep; ``wire`` the HTTP/1.1 details.

Rules: no container engine and no SQL here. The autoscaler drives the data plane only
through ``RevisionEndpoint`` (add, drain and remove instances; read its load samples), and
the control plane only through ``RoutingTable``. The hot path is callback style on asyncio
protocols with httptools parsers: no task or coroutine per request (a task only to open a
new upstream connection), and as few calls and allocations per request as we can manage.
"""

from cloudlet.dataplane.activator import Backend, RevisionEndpoint, Ticket, pick_backend
from cloudlet.dataplane.proxy import Router, RouterProtocol, RouterSettings, start_router
from cloudlet.dataplane.routing import RequestRecord, RoutingTable, ServiceRoute, pick_weighted

__all__ = [
    "Backend",
    "RequestRecord",
    "RevisionEndpoint",
    "Router",
    "RouterProtocol",
    "RouterSettings",
    "RoutingTable",
    "ServiceRoute",
    "Ticket",
    "pick_backend",
    "pick_weighted",
    "start_router",
]
