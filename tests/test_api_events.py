"""``GET /v1/jobs/{id}/events`` end to end: a real ``ben2q api`` process and worker,
redis-server and SeaweedFS; streams read with httpx as a browser's EventSource would."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Iterator

import httpx
import pytest
import redis
from apistack import ApiServer, photo, problem
from servers import redis_connections

from ben2q.jobs import JobStatus, make_request
from ben2q.status import KEYS, StatusStore, event_id, parse_event_id

TERMINAL = {"succeeded", "partial", "failed", "cancelled"}


def sse(lines: Iterable[str]) -> Iterator[dict]:
    """Events of an SSE body: dicts of ``event``/``data``/``id``, and ``{"comment": ...}``
    for each comment line (keep-alives)."""
    event: dict = {}
    for line in lines:
        if line == "":
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = event[name] + "\n" + value if name in event else value
    if event:
        yield event


async def asse(lines) -> list[dict]:
    """``sse`` of an async line iterator (the events only)."""
    out: list[dict] = []
    buffer: list[str] = []
    async for line in lines:
        buffer.append(line)
        if line == "":
            out += [e for e in sse(buffer) if "comment" not in e]
            buffer = []
    out += [e for e in sse(buffer) if "comment" not in e]
    return out


def stream(http: httpx.Client, job_id: str, **headers: str) -> list[dict]:
    """Every event of the job's stream, which must end by itself."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        return [e for e in sse(answer.iter_lines()) if "comment" not in e]


def held_record(redis_url: str, tenant: str, n: int = 1) -> JobStatus:
    """A queued job of ``tenant`` that no worker will run: its end is the test's to write."""
    inputs = [f"s3://api-in/{tenant}/held-{i}.png" for i in range(n)]
    kind = "single" if n == 1 else "batch"
    status = JobStatus.queued(make_request(kind, inputs, "s3://api-out/x/", tenant=tenant))
    with StatusStore(redis_url, ttl=3600) as store:
        store.create(status)
    return status


def finished(status: JobStatus, state: str = "succeeded") -> JobStatus:
    new = status.model_copy(deep=True)
    new.state = state  # type: ignore[assignment]
    new.attempts = 1
    new.progress = 1.0
    new.started_at = new.started_at or time.time()
    new.finished_at = time.time()
    return new


def subscribed_ports(raw: redis.Redis) -> set[int]:
    """Client ports of the Redis connections in pub/sub mode."""
    return {int(c["addr"].rsplit(":", 1)[1]) for c in raw.client_list() if int(c.get("sub", 0)) > 0}


@pytest.fixture(scope="module")
def quick_api(api_stack):
    """A second API process on the stack's Redis, with keep-alives every 0.5 s."""
    env = api_stack.env | {"BEN2Q_API_SSE_KEEPALIVE": "0.5"}
    server = ApiServer(env, api_stack.logs / "api-sse.log").start()
    yield server
    server.stop()


@pytest.fixture()
def raw(api_stack):
    client = redis.Redis.from_url(api_stack.redis_url)
    yield client
    client.close()


# --- one stream ------------------------------------------------------------------------


def test_a_real_job_streams_to_its_end(api_stack):
    key, token = api_stack.key("sse")
    uris = [api_stack.put(f"{key.id}/s{i}.png", photo(i)) for i in range(4)]
    with api_stack.client(token) as http:
        job = http.post("/v1/jobs", json={"inputs": uris}).json()
        started = time.monotonic()
        events = stream(http, job["id"])
        assert time.monotonic() - started < 60
        final = http.get(f"/v1/jobs/{job['id']}").json()
    assert events and all(e["event"] == "status" for e in events)
    records = [json.loads(e["data"]) for e in events]
    assert records[-1] == final and final["state"] == "succeeded"
    assert all(r["state"] not in TERMINAL for r in records[:-1])
    ids = [parse_event_id(e["id"]) for e in events]
    assert None not in ids and ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e["id"] for e in events] == [event_id(JobStatus(**r)) for r in records]
    progress = [r["progress"] for r in records]
    assert progress == sorted(progress)


def test_resume_with_last_event_id(api_stack):
    key, token = api_stack.key("sse-resume")
    uri = api_stack.put(f"{key.id}/r.png", photo(7))
    with api_stack.client(token) as http:
        job = http.post("/v1/jobs", json={"input": uri}, headers={"Prefer": "wait=30"}).json()
        assert job["state"] == "succeeded"
        [last] = stream(http, job["id"])  # a finished job: its record, then the end
        assert json.loads(last["data"]) == job
        started = time.monotonic()
        assert stream(http, job["id"], **{"Last-Event-ID": last["id"]}) == []
        assert time.monotonic() - started < 5  # ended by itself, nothing to wait for
        assert stream(http, job["id"], **{"Last-Event-ID": "0.0.0.0"}) == [last]
        assert stream(http, job["id"], **{"Last-Event-ID": "not-an-id"}) == [last]


def test_resume_skips_what_the_client_has(api_stack, quick_api):
    key, token = api_stack.key("sse-skip")
    held = held_record(api_stack.redis_url, key.id)
    running = held.model_copy(update={"state": "running", "attempts": 1, "progress": 0.5})
    with StatusStore(api_stack.redis_url, ttl=3600) as store:
        store.save(running)
        with httpx.Client(
            base_url=quick_api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as http:
            headers = {"Last-Event-ID": event_id(running)}
            with http.stream("GET", f"/v1/jobs/{held.id}/events", headers=headers) as answer:
                lines = answer.iter_lines()
                for event in sse(lines):  # the running record is skipped: keep-alives only
                    assert "comment" in event, event
                    break
                store.save(finished(held))
                events = [e for e in sse(lines) if "comment" not in e]
    assert [json.loads(e["data"])["state"] for e in events] == ["succeeded"]


def test_auth_and_tenancy(api_stack):
    key, token = api_stack.key("sse-owner")
    _, other = api_stack.key("sse-other")
    held = held_record(api_stack.redis_url, key.id)
    with api_stack.client() as http:
        problem(http.get(f"/v1/jobs/{held.id}/events"), 401, "unauthorized")
    with api_stack.client(other) as http:
        problem(http.get(f"/v1/jobs/{held.id}/events"), 404, "not_found")
    with api_stack.client(token) as http:
        problem(http.get("/v1/jobs/no-such-job/events"), 404, "not_found")
        problem(http.get("/v1/jobs/bad%20id/events"), 404, "not_found")
    with StatusStore(api_stack.redis_url, ttl=3600) as store:
        store.save(finished(held, "cancelled"))


def test_keep_alives_and_disconnects_free_the_waiter(api_stack, quick_api, raw):
    key, token = api_stack.key("sse-idle")
    held = held_record(api_stack.redis_url, key.id)
    channel = KEYS.events(held.id)
    with httpx.Client(
        base_url=quick_api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        with http.stream("GET", f"/v1/jobs/{held.id}/events") as answer:
            assert answer.headers["cache-control"] == "no-store"
            seen = []
            started = time.monotonic()
            for event in sse(answer.iter_lines()):
                seen.append(event)
                if sum("comment" in e for e in seen) == 3:
                    break
            assert time.monotonic() - started < 3  # every 0.5 s
            assert json.loads(seen[0]["data"])["state"] == "queued"
            assert raw.pubsub_numsub(channel)[0][1] == 1
        # the client went away: the API drops the waiter and, within a second or two,
        # the channel's subscription
        deadline = time.monotonic() + 10
        while raw.pubsub_numsub(channel)[0][1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert raw.pubsub_numsub(channel)[0][1] == 0
    assert quick_api.alive()
    with StatusStore(api_stack.redis_url, ttl=3600) as store:
        store.save(finished(held, "cancelled"))


# --- many streams ----------------------------------------------------------------------


def test_hundreds_of_streams_few_redis_connections(api_stack, quick_api, raw):
    key, token = api_stack.key("sse-many")
    n = 300
    helds = [held_record(api_stack.redis_url, key.id) for _ in range(n)]
    pid = quick_api.proc.pid
    redis_port = int(api_stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    measured: dict[str, object] = {}

    async def follow(http: httpx.AsyncClient, job_id: str, opened: asyncio.Event) -> list[dict]:
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
            assert answer.status_code == 200
            events: list[dict] = []
            buffer: list[str] = []
            async for line in answer.aiter_lines():
                buffer.append(line)
                if line == "":
                    events += [e for e in sse(buffer) if "comment" not in e]
                    buffer = []
                    if events and not opened.is_set():
                        opened.set()
            return events

    async def main() -> list[list[dict]]:
        limits = httpx.Limits(max_connections=n + 50, max_keepalive_connections=n + 50)
        async with httpx.AsyncClient(
            base_url=quick_api.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(60, pool=60),
            limits=limits,
        ) as http:
            opened = [asyncio.Event() for _ in helds]
            tasks = [
                asyncio.create_task(follow(http, h.id, o))
                for h, o in zip(helds, opened, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 60)
            ports = redis_connections(pid, redis_port)
            measured["while open"] = len(ports)
            measured["subscribers"] = len(ports & subscribed_ports(raw))
            measured["numsub"] = raw.pubsub_numsub(KEYS.events(helds[0].id))[0][1]
            assert not any(t.done() for t in tasks)
            started = time.monotonic()
            with StatusStore(api_stack.redis_url, ttl=3600) as store:
                for held in helds:
                    store.save(finished(held))
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            measured["seconds to all final"] = round(time.monotonic() - started, 2)
            measured["after"] = len(redis_connections(pid, redis_port))
            return results

    results = asyncio.run(main())
    print("API process Redis connections:", measured)
    for held, events in zip(helds, results, strict=True):
        states = [json.loads(e["data"])["state"] for e in events]
        assert states == ["queued", "succeeded"], (held.id, states)
    # one subscription for 300 streams; the pool (16) + the hub + the broker's few
    assert measured["subscribers"] == 1 and measured["numsub"] == 1
    assert measured["while open"] <= 16 + 1 + 4, measured
    assert quick_api.alive()


def test_streams_of_real_jobs_and_prefer_wait_together(api_stack):
    key, token = api_stack.key("sse-real")
    uri = api_stack.put(f"{key.id}/m.png", photo(9))

    async def main() -> tuple[list[list[dict]], list[dict]]:
        async with httpx.AsyncClient(
            base_url=api_stack.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
            limits=httpx.Limits(max_connections=200),
        ) as http:
            jobs = [(await http.post("/v1/jobs", json={"input": uri})).json() for _ in range(8)]

            async def follow(job_id: str) -> list[dict]:
                async with http.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
                    return await asse(answer.aiter_lines())

            streams = [follow(job["id"]) for job in jobs for _ in range(5)]
            waits = [
                http.post("/v1/jobs", json={"input": uri}, headers={"Prefer": "wait=60"})
                for _ in range(4)
            ]
            results = await asyncio.gather(*streams, *waits)
            return results[: len(streams)], [r.json() for r in results[len(streams) :]]

    streamed, waited = asyncio.run(main())
    assert len(streamed) == 40
    for events in streamed:
        assert json.loads(events[-1]["data"])["state"] == "succeeded"
    assert [w["state"] for w in waited] == ["succeeded"] * 4


def test_eventsource_ticket_streams_one_job_without_the_key(api_stack):
    """Browsers' EventSource sends no headers: a ticket URL made with the key streams that
    one job, reconnects included, and nothing else (another job, a guessed ticket)."""
    key, token = api_stack.key("ticketed")
    _, other_token = api_stack.key("ticket-other")
    job = held_record(api_stack.redis_url, key.id)
    other_job = held_record(api_stack.redis_url, key.id)
    with api_stack.client(token) as http, api_stack.client() as anonymous:
        made = http.post(f"/v1/jobs/{job.id}/events/ticket")
        assert made.status_code == 201, made.text
        ticket = made.json()
        assert ticket["url"].startswith(f"/v1/jobs/{job.id}/events?ticket=")
        assert ticket["expires_at"] == pytest.approx(time.time() + 300, abs=10)
        assert token not in ticket["url"]
        with StatusStore(api_stack.redis_url, ttl=3600) as store:
            store.save(finished(job))
        with anonymous.stream("GET", ticket["url"]) as answer:
            assert answer.status_code == 200
            events = [e for e in sse(answer.iter_lines()) if "comment" not in e]
        assert json.loads(events[-1]["data"])["state"] == "succeeded"
        again = anonymous.get(ticket["url"], headers={"Last-Event-ID": events[-1]["id"]})
        assert again.status_code == 200 and "data:" not in again.text  # reconnect: ends at once
        query = ticket["url"].split("?", 1)[1]
        problem(anonymous.get(f"/v1/jobs/{other_job.id}/events?{query}"), 401, "unauthorized")
        problem(anonymous.get(f"/v1/jobs/{job.id}/events?ticket=guess"), 401, "unauthorized")
        problem(anonymous.get(f"/v1/jobs/{job.id}"), 401, "unauthorized")
    with api_stack.client(other_token) as stranger:
        problem(stranger.post(f"/v1/jobs/{job.id}/events/ticket"), 404, "not_found")
