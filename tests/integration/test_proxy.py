"""The router end to end: real sockets on 127.0.0.1, small upstream servers as instances."""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvloop

from cloudlet.dataplane import (
    RequestRecord,
    RevisionEndpoint,
    RouterSettings,
    RoutingTable,
    ServiceRoute,
    start_router,
)
from cloudlet.dataplane.routing import trace_text
from cloudlet.dataplane.wire import (
    forwarded_for,
    forwarded_host,
    trace_context,
    whole_response,
)
from tests.integration.dataplane_helpers import (
    DOMAIN,
    Env,
    raw_exchange,
    read_response,
    router_env,
    status_of,
)

MB = 1024 * 1024


def echoed(response: httpx.Response) -> dict[str, object]:
    payload: dict[str, object] = response.json()
    return payload


def header_pairs(payload: dict[str, object]) -> list[tuple[str, str]]:
    headers = payload["headers"]
    assert isinstance(headers, list)
    return [(str(k), str(v)) for k, v in headers]


def header(payload: dict[str, object], name: str) -> str | None:
    values = [v for k, v in header_pairs(payload) if k.lower() == name.lower()]
    return ", ".join(values) if values else None


async def serving(
    env: Env, cc: int = 80, timeout: float = 5.0, queue_limit: int | None = None
) -> tuple[RevisionEndpoint, httpx.AsyncClient]:
    """One service 'hello' with one instance; a client addressed to it."""
    upstream = await env.upstream()
    endpoint = env.endpoint(cc=cc, timeout=timeout, queue_limit=queue_limit)
    endpoint.add_backend("i1", "127.0.0.1", upstream.port)
    return endpoint, env.client(headers={"Host": env.host("hello")})


# -- the basics ----------------------------------------------------------------------------------


async def test_get_and_post_reach_the_instance_and_come_back() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        got = await client.get("/echo?x=1")
        assert got.status_code == 200
        assert echoed(got)["method"] == "GET"
        assert echoed(got)["path"] == "/echo?x=1"
        posted = await client.post("/echo", content=b"hello body")
        assert echoed(posted)["body"] == "hello body"
        assert header(echoed(posted), "content-length") == "10"
        teapot = await client.get("/status/418")
        assert teapot.status_code == 418
        assert teapot.headers["x-upstream"] == "u1"


async def test_upstream_connections_are_kept_alive_and_reused() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        for _ in range(20):
            assert (await client.get("/status/200")).status_code == 200
        assert env.upstreams[0].accepted == 1
        assert len(env.upstreams[0].requests) == 20


async def test_the_concurrency_cap_is_never_exceeded_at_the_instance() -> None:
    async with router_env() as env:
        endpoint, client = await serving(env, cc=2)
        responses = await asyncio.gather(*(client.get("/sleep/0.05") for _ in range(10)))
        assert [r.status_code for r in responses] == [200] * 10
        assert env.upstreams[0].peak == 2
        assert (endpoint.in_flight, endpoint.queued) == (0, 0)


async def test_waiting_requests_are_served_in_arrival_order() -> None:
    async with router_env() as env:
        endpoint, client = await serving(env, cc=1)
        upstream = env.upstreams[0]
        first = asyncio.create_task(client.get("/hold"))
        waiting = []
        for i in range(4):
            await until(lambda n=i: endpoint.queued == n and len(upstream.requests) == 1)
            waiting.append(asyncio.create_task(client.get(f"/echo?{i}")))
        await until(lambda: endpoint.queued == 4)
        upstream.release.set()
        assert (await first).status_code == 200
        assert [(await w).status_code for w in waiting] == [200] * 4
        assert [r.path for r in upstream.requests] == ["/hold"] + [f"/echo?{i}" for i in range(4)]


async def test_a_full_queue_answers_503() -> None:
    async with router_env() as env:
        endpoint, client = await serving(env, cc=1, queue_limit=1)
        first = asyncio.create_task(client.get("/hold"))
        await until(lambda: endpoint.in_flight == 1)
        second = asyncio.create_task(client.get("/echo"))
        await until(lambda: endpoint.queued == 1)
        refused = await client.get("/echo")
        assert refused.status_code == 503
        assert "queue full" in refused.text
        env.upstreams[0].release.set()
        assert (await first).status_code == (await second).status_code == 200


async def test_no_instance_within_the_timeout_answers_503_and_asks_for_one() -> None:
    async with router_env() as env:
        demands: list[int] = []

        def on_demand(endpoint: RevisionEndpoint) -> None:
            demands.append(endpoint.queued)

        endpoint = env.endpoint(timeout=0.3, on_demand=on_demand)
        client = env.client(headers={"Host": env.host("hello")})
        started = time.monotonic()
        response = await client.get("/")
        assert response.status_code == 503
        assert "no instance became available within 0.3s" in response.text
        assert 0.25 <= time.monotonic() - started < 2
        assert demands == [1]
        assert endpoint.queued == 0


async def test_an_instance_added_while_requests_wait_serves_them() -> None:
    async with router_env() as env:
        upstream = await env.upstream()

        def start_one(endpoint: RevisionEndpoint) -> None:
            if not endpoint.backends:  # the autoscaler's cold start, done at once here
                endpoint.add_backend("i1", "127.0.0.1", upstream.port)

        def on_demand(endpoint: RevisionEndpoint) -> None:
            asyncio.get_running_loop().call_later(0.1, start_one, endpoint)

        endpoint = env.endpoint(on_demand=on_demand)
        client = env.client(headers={"Host": env.host("hello")})
        responses = await asyncio.gather(*(client.get(f"/echo?{i}") for i in range(3)))
        assert [r.status_code for r in responses] == [200] * 3
        assert endpoint.requests_total == 3


# -- failures ------------------------------------------------------------------------------------


async def test_a_slow_instance_gets_504_at_the_timeout_and_the_slot_is_freed() -> None:
    async with router_env() as env:
        endpoint, client = await serving(env, cc=1, timeout=0.4)
        started = time.monotonic()
        response = await client.get("/sleep/3")
        assert response.status_code == 504
        assert "did not respond within 0.4s" in response.text
        assert time.monotonic() - started < 2
        assert endpoint.in_flight == 0
        assert (await client.get("/echo")).status_code == 200  # the slot is free again


async def test_a_response_that_started_in_time_streams_on_past_the_timeout() -> None:
    async with router_env() as env:
        _, client = await serving(env, timeout=0.3)
        body = b"".join([b async for b in stream_body(client, "/bytes/3000000")])
        assert len(body) == 3_000_000


async def test_an_instance_dying_mid_request_gives_502_without_hanging() -> None:
    async with router_env() as env:
        errors: list[str] = []
        endpoint, client = await serving(env)
        endpoint.on_backend_error = errors.append
        died = await client.get("/die")
        assert died.status_code == 502
        assert "instance i1" in died.text
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/die-mid-response")
        assert errors == ["i1", "i1"]
        assert endpoint.in_flight == 0


async def test_connect_failure_gives_502_and_reports_the_instance() -> None:
    async with router_env() as env:
        errors: list[str] = []
        endpoint = env.endpoint()
        endpoint.on_backend_error = errors.append
        endpoint.add_backend("gone", "127.0.0.1", unused_port())
        client = env.client(headers={"Host": env.host("hello")})
        response = await client.get("/")
        assert response.status_code == 502
        assert "could not connect to instance gone" in response.text
        assert errors == ["gone"]


async def test_removing_an_instance_fails_its_requests_with_502_at_once() -> None:
    async with router_env() as env:
        endpoint, client = await serving(env)
        held = asyncio.create_task(client.get("/hold"))
        await until(lambda: endpoint.in_flight == 1 and bool(env.upstreams[0].requests))
        endpoint.remove_backend("i1", "the container exited with code 137")
        response = await asyncio.wait_for(held, 2)
        assert response.status_code == 502
        assert "exited with code 137" in response.text
        assert endpoint.in_flight == 0


async def test_drain_waits_for_requests_in_flight_then_resolves() -> None:
    async with router_env() as env:
        endpoint, client = await serving(env)
        held = asyncio.create_task(client.get("/hold"))
        await until(lambda: bool(env.upstreams[0].requests))
        drained = endpoint.drain_backend("i1")
        await asyncio.sleep(0.05)
        assert not drained.done()
        env.upstreams[0].release.set()
        assert (await held).status_code == 200
        await asyncio.wait_for(drained, 2)
        assert "i1" not in endpoint.backends


async def test_a_stale_pooled_connection_is_retried_once_without_an_error() -> None:
    async with router_env() as env:
        upstream = await env.upstream(drop_reused=True)
        endpoint = env.endpoint()
        endpoint.add_backend("i1", "127.0.0.1", upstream.port)
        client = env.client(headers={"Host": env.host("hello")})
        for _ in range(3):
            assert (await client.get("/status/200")).status_code == 200
        assert (await client.post("/echo", content=b"small body")).status_code == 200
        assert upstream.accepted >= 4


# -- streaming -----------------------------------------------------------------------------------


async def stream_body(client: httpx.AsyncClient, path: str) -> AsyncIterator[bytes]:
    async with client.stream("GET", path) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            yield chunk


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


class PeakRss:
    """Samples this process's resident memory while a transfer runs."""

    def __init__(self) -> None:
        self.start = rss_bytes()
        self.peak = self.start
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            await asyncio.sleep(0.02)

    @property
    def growth(self) -> int:
        return self.peak - self.start


async def test_a_100mb_upload_streams_through_in_bounded_memory() -> None:
    settings = RouterSettings(max_body_bytes=200 * MB)
    async with router_env(settings) as env:
        _, client = await serving(env, timeout=60)
        size = 100 * MB
        piece = b"u" * (64 * 1024)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // len(piece)):
                yield piece

        async with PeakRss() as rss:
            response = await client.post(
                "/count", content=body(), headers={"Content-Length": str(size)}, timeout=60
            )
        assert response.status_code == 200
        assert response.text == str(size)
        assert rss.growth < 20 * MB


async def test_a_100mb_download_streams_through_in_bounded_memory() -> None:
    async with router_env() as env:
        _, client = await serving(env, timeout=60)
        size = 100 * MB
        received = 0
        async with PeakRss() as rss:
            async for chunk in stream_body(client, f"/bytes/{size}"):
                received += len(chunk)
        assert received == size
        assert rss.growth < 20 * MB


async def test_chunked_bodies_pass_both_ways() -> None:
    async with router_env() as env:
        _, client = await serving(env)

        async def body() -> AsyncIterator[bytes]:
            for part in (b"first,", b"second,", b"third"):
                yield part

        response = await client.post("/echo", content=body())
        assert echoed(response)["body"] == "first,second,third"
        assert header(echoed(response), "transfer-encoding") == "chunked"
        down = await client.get("/bytes/300000?chunked")
        assert down.headers["transfer-encoding"] == "chunked"
        assert len(down.content) == 300_000
        until_close = await client.get("/bytes/200000?eof")
        assert len(until_close.content) == 200_000
        assert until_close.headers["transfer-encoding"] == "chunked"  # framed anew


# -- headers -------------------------------------------------------------------------------------


async def test_the_instance_sees_forwarding_and_trace_headers() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        payload = echoed(await client.get("/echo"))
        host = env.host("hello")
        assert header(payload, "host") == host
        assert header(payload, "x-forwarded-for") == "127.0.0.1"
        assert header(payload, "x-forwarded-proto") == "http"
        assert header(payload, "x-forwarded-host") == host
        assert header(payload, "forwarded") == f"for=127.0.0.1;host={host};proto=http"
        traceparent = header(payload, "traceparent")
        assert traceparent is not None
        match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", traceparent)
        assert match is not None
        assert header(payload, "x-cloud-trace-context") == (
            f"{match.group(1)}/{int(match.group(2), 16)};o=1"
        )


async def test_incoming_trace_and_forwarding_headers_are_kept_and_extended() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        payload = echoed(
            await client.get(
                "/echo",
                headers={
                    "traceparent": traceparent,
                    "X-Forwarded-For": "203.0.113.7",
                    "Forwarded": "for=203.0.113.7",
                    "X-Forwarded-Proto": "https",
                },
            )
        )
        assert header(payload, "traceparent") == traceparent
        assert header(payload, "x-cloud-trace-context") == (
            f"0af7651916cd43dd8448eb211c80319c/{int('b7ad6b7169203331', 16)};o=1"
        )
        assert header(payload, "x-forwarded-for") == "203.0.113.7, 127.0.0.1"
        assert str(header(payload, "forwarded")).startswith("for=203.0.113.7, for=127.0.0.1")
        assert header(payload, "x-forwarded-proto") == "http"
        cloud = echoed(
            await client.get(
                "/echo", headers={"X-Cloud-Trace-Context": "105445aa7843bc8bf206b12000100000/1;o=1"}
            )
        )
        assert header(cloud, "traceparent") == (
            "00-105445aa7843bc8bf206b12000100000-0000000000000001-01"
        )
        assert header(cloud, "x-cloud-trace-context") == "105445aa7843bc8bf206b12000100000/1;o=1"
        bad = echoed(await client.get("/echo", headers={"traceparent": "00-zz-01"}))
        assert header(bad, "traceparent") != "00-zz-01"


async def test_hop_by_hop_headers_are_stripped_both_ways() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        payload = echoed(
            await client.get(
                "/echo",
                headers={
                    "Connection": "keep-alive, X-Secret",
                    "X-Secret": "1",
                    "Keep-Alive": "timeout=5",
                    "TE": "trailers",
                    "Upgrade": "h2c",
                    "Proxy-Connection": "keep-alive",
                    "X-Kept": "yes",
                },
            )
        )
        names = {k.lower() for k, _ in header_pairs(payload)}
        for name in ("connection", "x-secret", "keep-alive", "te", "upgrade", "proxy-connection"):
            assert name not in names
        assert header(payload, "x-kept") == "yes"
        response = await client.get("/hop-headers")
        assert response.text == "ok"
        for name in ("connection", "x-private", "keep-alive", "upgrade", "trailer"):
            assert name not in response.headers
        assert response.headers["x-kept"] == "yes"


async def test_an_unknown_host_gets_404_naming_it() -> None:
    async with router_env() as env:
        await serving(env)
        client = env.client(headers={"Host": "nothing.run.test"})
        response = await client.get("/")
        assert response.status_code == 404
        assert "no service is deployed at nothing.run.test" in response.text
        assert "cloudlet run services list" in response.text
        assert response.headers["content-type"].startswith("text/plain")
        assert (await client.get("/")).status_code == 404  # the connection was kept


async def test_hosts_match_with_and_without_port_and_in_any_case() -> None:
    async with router_env() as env:
        await serving(env)
        for host in (env.host("hello"), f"{env.host('hello')}:{env.port}", "HELLO.Run.Test"):
            client = env.client(headers={"Host": host})
            assert (await client.get("/echo")).status_code == 200


async def test_tags_reach_their_revision() -> None:
    async with router_env() as env:
        one, two = await env.upstream("one"), await env.upstream("two")
        first = RevisionEndpoint("hello", "hello-00001", container_concurrency=80, timeout=5)
        second = RevisionEndpoint("hello", "hello-00002", container_concurrency=80, timeout=5)
        first.add_backend("a", "127.0.0.1", one.port)
        second.add_backend("b", "127.0.0.1", two.port)
        env.table.set_service(ServiceRoute("hello", ((first, 100),), tags={"canary": second}))
        main = env.client(headers={"Host": env.host("hello")})
        canary = env.client(headers={"Host": env.host("hello", "canary")})
        assert (await main.get("/")).headers["x-upstream"] == "one"
        assert (await canary.get("/")).headers["x-upstream"] == "two"


async def test_a_90_10_split_holds_over_1000_requests() -> None:
    async with router_env(seed=1234) as env:
        one, two = await env.upstream("one"), await env.upstream("two")
        first = RevisionEndpoint("hello", "hello-00001", container_concurrency=80, timeout=5)
        second = RevisionEndpoint("hello", "hello-00002", container_concurrency=80, timeout=5)
        first.add_backend("a", "127.0.0.1", one.port)
        second.add_backend("b", "127.0.0.1", two.port)
        env.table.set_service(ServiceRoute("hello", ((first, 90), (second, 10))))
        client = env.client(headers={"Host": env.host("hello")})

        async def worker(n: int) -> list[str]:
            return [(await client.get("/")).headers["x-upstream"] for _ in range(n)]

        picks = [
            name
            for names in await asyncio.gather(*(worker(100) for _ in range(10)))
            for name in names
        ]
        assert len(picks) == 1000
        assert 52 <= picks.count("two") <= 148  # binomial(1000, .1): 100 ± 5 sd


async def test_private_services_need_the_authorizer_to_allow() -> None:
    async with router_env() as env:
        upstream = await env.upstream()
        endpoint = env.endpoint()
        endpoint.add_backend("i1", "127.0.0.1", upstream.port)
        env.table.set_service(ServiceRoute("hello", ((endpoint, 100),), public=False))
        client = env.client(headers={"Host": env.host("hello")})
        refused = await client.get("/")
        assert refused.status_code == 403
        assert "requires authentication" in refused.text
        env.table.authorize = lambda route, auth: (
            None if auth == b"Bearer ok" else (401, "send a valid identity token")
        )
        assert (await client.get("/")).status_code == 401
        assert (await client.get("/", headers={"Authorization": "Bearer ok"})).status_code == 200


async def test_every_request_is_recorded_when_a_hook_is_set() -> None:
    async with router_env() as env:
        records: list[RequestRecord] = []
        _, client = await serving(env)
        env.table.on_request_done = records.append
        await client.post("/echo?q=1", content=b"12345", headers={"User-Agent": "tester/1"})
        await env.client(headers={"Host": "nope.run.test"}).get("/x")
        ok, missing = records
        assert (ok.service, ok.revision, ok.backend) == ("hello", "hello-00001", "i1")
        assert (ok.method, ok.url, ok.status) == (b"POST", b"/echo?q=1", 200)
        assert ok.request_bytes == 5 and ok.response_bytes > 5
        assert ok.remote_ip == "127.0.0.1" and ok.user_agent == b"tester/1"
        trace = trace_text(ok.trace)
        assert trace is not None and len(trace) == 32 and int(trace, 16)
        assert abs(ok.end - time.time()) < 60
        assert 0 < ok.latency < 5
        assert (missing.status, missing.service) == (404, None)


# -- malformed and hostile clients ---------------------------------------------------------------


def request(host: str, extra: str = "", body: bytes = b"", method: str = "GET") -> bytes:
    return f"{method} / HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode() + body


async def test_oversized_request_heads_get_431() -> None:
    async with router_env() as env:
        await serving(env)
        host = env.host("hello")
        big = await raw_exchange(env.port, request(host, f"X-Big: {'a' * 70_000}\r\n"))
        assert status_of(big) == 431
        many = "".join(f"X-H{i}: v\r\n" for i in range(250))
        assert status_of(await raw_exchange(env.port, request(host, many))) == 431
        assert env.upstreams[0].requests == []


async def test_oversized_bodies_get_413() -> None:
    async with router_env(RouterSettings(max_body_bytes=1000)) as env:
        await serving(env)
        host = env.host("hello")
        declared = await raw_exchange(
            env.port, request(host, "Content-Length: 5000\r\n", method="POST")
        )
        assert status_of(declared) == 413
        chunks = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
        chunked = await raw_exchange(
            env.port, request(host, "Transfer-Encoding: chunked\r\n", chunks, method="POST")
        )
        assert status_of(chunked) == 413


@pytest.mark.parametrize(
    ("extra", "body"),
    [
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        ("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
        ("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        ("Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
        ("Content-Length: -5\r\n", b""),
    ],
)
async def test_ambiguous_framing_gets_400_and_is_never_forwarded(extra: str, body: bytes) -> None:
    async with router_env() as env:
        await serving(env)
        response = await raw_exchange(
            env.port, request(env.host("hello"), extra, body, method="POST")
        )
        assert status_of(response) == 400
        assert env.upstreams[0].requests == []


async def test_a_malformed_request_does_not_disturb_other_connections() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        garbage = await raw_exchange(env.port, b"\x00\x01 NOT HTTP\r\n\r\n")
        assert status_of(garbage) == 400
        assert (await client.get("/echo")).status_code == 200


async def test_a_slowloris_client_is_cut_off_while_others_are_served() -> None:
    async with router_env(RouterSettings(header_timeout=0.5)) as env:
        _, client = await serving(env)
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        answered = asyncio.Event()

        async def dribble() -> None:
            for byte in b"GET / HTTP/1.1\r\nHost: slow.run.test\r\nX-Pad: " + b"a" * 100:
                if answered.is_set() or writer.is_closing():
                    return
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

        started = time.monotonic()
        dribbler = asyncio.create_task(dribble())
        try:
            for _ in range(4):
                assert (await client.get("/echo")).status_code == 200  # others are served
                await asyncio.sleep(0.05)
            answer = await asyncio.wait_for(reader.read(-1), 3)
            elapsed = time.monotonic() - started
        finally:
            answered.set()
            await asyncio.gather(dribbler, return_exceptions=True)
            writer.close()
        assert status_of(answer) == 408
        assert 0.4 < elapsed < 2.5


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with router_env() as env:
        _, _ = await serving(env)
        host = env.host("hello")
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(
                request(host, "", method="GET").replace(b"/ ", b"/sleep/0.2 ")
                + request(host).replace(b"/ ", b"/echo?2 ")
                + b"POST /echo?3 HTTP/1.1\r\nHost: "
                + host.encode()
                + b"\r\nContent-Length: 3\r\n\r\nabc"
                + request("nowhere.test").replace(b"/ ", b"/4 ")
                + request(host).replace(b"/ ", b"/echo?5 ")
            )
            answers = [await asyncio.wait_for(read_response(reader), 3) for _ in range(5)]
        finally:
            writer.close()
        assert [status for status, _, _ in answers] == [200, 200, 200, 404, 200]
        assert b"/sleep/0.2" in answers[0][2]
        assert json.loads(answers[1][2])["path"] == "/echo?2"
        assert json.loads(answers[2][2])["body"] == "abc"
        assert json.loads(answers[4][2])["path"] == "/echo?5"


async def test_http10_clients_get_a_response_they_can_read() -> None:
    async with router_env() as env:
        await serving(env)
        host = env.host("hello").encode()
        plain = await raw_exchange(env.port, b"GET /echo HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
        assert status_of(plain) == 200
        chunked = await raw_exchange(
            env.port, b"GET /bytes/1000?chunked HTTP/1.0\r\nHost: " + host + b"\r\n\r\n"
        )
        head, _, body = chunked.partition(b"\r\n\r\n")
        assert b"chunked" not in head.lower()  # HTTP/1.0 has no chunked coding
        assert body == b"y" * 1000
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            for _ in range(2):
                writer.write(
                    b"GET /echo HTTP/1.0\r\nHost: " + host + b"\r\nConnection: keep-alive\r\n\r\n"
                )
                status, headers, _ = await asyncio.wait_for(read_response(reader), 3)
                assert (status, headers["connection"]) == (200, "keep-alive")
        finally:
            writer.close()


async def test_expect_100_continue_is_answered_by_the_router() -> None:
    async with router_env() as env:
        await serving(env)
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(
                request(
                    env.host("hello"),
                    "Expect: 100-continue\r\nContent-Length: 4\r\n",
                    method="POST",
                ).replace(b"/ ", b"/echo ")
            )
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"data")
            status, _, body = await asyncio.wait_for(read_response(reader), 3)
        finally:
            writer.close()
        assert status == 200
        assert json.loads(body)["body"] == "data"
        assert header(json.loads(body), "expect") is None


async def test_head_requests_get_heads_only_and_keep_the_connection() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        for _ in range(2):
            response = await client.head("/echo")
            assert response.status_code == 200
            assert response.content == b""
        assert (await client.get("/echo")).status_code == 200
        assert env.upstreams[0].accepted == 1


async def test_interim_responses_from_the_instance_are_not_passed_on() -> None:
    async with router_env() as env:
        _, client = await serving(env)
        response = await client.get("/early-hints")
        assert response.status_code == 200
        assert "link" not in response.headers


async def test_a_client_asking_to_close_gets_its_answer_then_the_close() -> None:
    async with router_env() as env:
        await serving(env)
        answer = await raw_exchange(env.port, request(env.host("hello"), "Connection: close\r\n"))
        assert status_of(answer) == 200
        assert b"connection: close" in answer.lower()


async def test_an_unsupported_expectation_gets_417() -> None:
    async with router_env() as env:
        await serving(env)
        answer = await raw_exchange(
            env.port, request(env.host("hello"), "Expect: magic\r\nConnection: close\r\n")
        )
        assert status_of(answer) == 417


async def test_a_client_leaving_the_queue_frees_its_place() -> None:
    async with router_env() as env:
        endpoint, client = await serving(env, cc=1)
        held = asyncio.create_task(client.get("/hold"))
        await until(lambda: endpoint.in_flight == 1)
        _, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(request(env.host("hello")))
        await until(lambda: endpoint.queued == 1)
        writer.close()
        await until(lambda: endpoint.queued == 0)
        env.upstreams[0].release.set()
        assert (await held).status_code == 200
        assert (await client.get("/echo")).status_code == 200
        assert [r.path for r in env.upstreams[0].requests] == ["/hold", "/echo"]


async def test_a_half_closed_client_still_gets_its_answer() -> None:
    async with router_env() as env:
        await serving(env)
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(request(env.host("hello")).replace(b"/ ", b"/sleep/0.1 "))
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(-1), 3)
        finally:
            writer.close()
        assert status_of(answer) == 200


async def test_a_client_leaving_mid_response_frees_the_slot_and_drops_the_connection() -> None:
    async with router_env() as env:
        endpoint, _ = await serving(env, cc=1)
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(request(env.host("hello")).replace(b"/ ", b"/bytes/50000000 "))
        await reader.readexactly(100_000)
        writer.transport.abort()
        await until(lambda: endpoint.in_flight == 0)
        client = env.client(headers={"Host": env.host("hello")})
        assert (await client.get("/echo")).status_code == 200
        assert env.upstreams[0].accepted == 2  # the cut connection was not reused


async def test_connections_over_the_limit_are_refused_with_503() -> None:
    async with router_env(RouterSettings(max_client_connections=1)) as env:
        await serving(env)
        _, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            await until(lambda: len(env.router.connections) == 1)
            answer = await raw_exchange(env.port, request(env.host("hello")))
            assert status_of(answer) == 503
        finally:
            writer.close()


# -- lifecycle and loops --------------------------------------------------------------------------


async def test_start_router_serves_and_closing_the_server_closes_idle_connections() -> None:
    table = RoutingTable(DOMAIN)
    settings = RouterSettings(client_idle_timeout=0.4, header_timeout=0.4)
    server = await start_router(table, "127.0.0.1", 0, settings)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a.run.test\r\n\r\n")
        status, _, _ = await asyncio.wait_for(read_response(reader), 3)
        assert status == 404
        server.close()
        await server.wait_closed()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the router
    finally:
        writer.close()


async def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout() -> None:
    async with router_env(RouterSettings(client_idle_timeout=0.3)) as env:
        await serving(env)
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(request(env.host("hello")))
            await asyncio.wait_for(read_response(reader), 3)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert 0.2 < time.monotonic() - started < 2
        finally:
            writer.close()


def test_the_router_runs_on_uvloop() -> None:
    async def scenario() -> None:
        async with router_env() as env:
            _, client = await serving(env)
            assert (await client.get("/echo")).status_code == 200
            posted = await client.post("/count", content=b"x" * 1_000_000)
            assert posted.text == "1000000"
            assert len((await client.get("/bytes/2000000?chunked")).content) == 2_000_000
            responses = await asyncio.gather(*(client.get("/sleep/0.01") for _ in range(20)))
            assert {r.status_code for r in responses} == {200}
            assert env.upstreams[0].accepted <= 20

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# -- wire helpers ---------------------------------------------------------------------------------


def test_forwarded_elements_quote_what_must_be_quoted() -> None:
    assert forwarded_for("10.0.0.1") == b"for=10.0.0.1"
    assert forwarded_for("::1") == b'for="[::1]"'
    assert forwarded_host(b"a.example.com") == b"a.example.com"
    assert forwarded_host(b"a.example.com:8080") == b'"a.example.com:8080"'


def test_trace_context_keeps_valid_ids_and_replaces_invalid_ones() -> None:
    bits = random.Random(3).getrandbits
    kept = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_context(kept, None, bits)[0] == kept
    for invalid in (
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        b"junk",
    ):
        header_value, cloud, trace_id = trace_context(invalid, None, bits)
        assert header_value != invalid
        assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-01", header_value)
        assert cloud.startswith(trace_id + b"/")


def test_only_one_whole_plain_response_passes_byte_for_byte() -> None:
    ok = b"HTTP/1.1 200 Fine\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"
    assert whole_response(ok) == 3 << 10 | 200
    assert whole_response(ok.replace(b"200 Fine", b"404 Gone")) == 3 << 10 | 404
    for refused in (
        ok + b"HTTP",  # more than one response
        ok[:-1],  # not all of the body
        ok.replace(b"Content-Type: text/plain", b"Connection: close"),
        ok.replace(b"Content-Type: text/plain", b"Keep-Alive: timeout=5"),
        ok.replace(b"Content-Type: text/plain", b"Content-Length: 3"),
        ok.replace(b"Content-Length: 3", b"Transfer-Encoding: chunked"),
        ok.replace(b"Content-Length: 3", b"Content-Length: x"),
        ok.replace(b"\r\nContent-Type", b"\nContent-Type"),
        ok.replace(b"\r\nContent-Type: text/plain", b"\r\n folded"),
        ok.replace(b"200 Fine", b"204 No Content"),
        ok.replace(b"HTTP/1.1", b"HTTP/1.0"),
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ):
        assert whole_response(refused) == -1, refused


# -- helpers ---------------------------------------------------------------------------------------


async def until(condition: object, timeout: float = 3.0) -> None:
    """Wait until ``condition()`` holds (polling the loop), or fail."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
