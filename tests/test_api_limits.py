"""Idempotency, rate limits, back-pressure and CORS of the HTTP API, end to end: real
``ben2q api`` processes (two replicas sharing one Redis where it matters), a real worker,
redis-server and SeaweedFS."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import redis
from apistack import ApiServer, photo, problem

from ben2q.keys import WINDOW


@pytest.fixture(scope="module")
def replica(api_stack):
    """A second API process on the same Redis and storage (another replica)."""
    server = ApiServer(api_stack.env, api_stack.logs / "replica-limits.log").start()
    yield server
    server.stop()


@pytest.fixture()
def extra_api(api_stack):
    """Start API processes with extra settings; all stopped after the test."""
    started: list[ApiServer] = []

    def start(name: str, **env: str) -> ApiServer:
        server = ApiServer({**api_stack.env, **env}, api_stack.logs / f"{name}.log").start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def client_to(url: str, token: str | None = None) -> httpx.Client:
    """An httpx client of one API process (``api_stack.client`` talks to the first)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def fresh_window(need: float = 8.0) -> None:
    """Wait for a new rate-limit window when this one has less than ``need`` seconds left,
    so counts in a test never straddle two windows."""
    left = WINDOW - time.time() % WINDOW
    if left < need:
        time.sleep(left + 0.05)


def items(header: str) -> dict[str, dict[str, str]]:
    """``"name";a=1;b=2, ...`` (a Structured Fields list of strings with parameters)."""
    out = {}
    for member in header.split(","):
        name, *params = member.strip().split(";")
        assert name.startswith('"') and name.endswith('"'), header
        out[name.strip('"')] = dict(p.split("=", 1) for p in params)
    return out


# --- idempotency ----------------------------------------------------------------------


def test_idempotent_retry_gives_the_same_job_and_answer(api_stack, replica):
    key, token = api_stack.key("idem")
    uri = api_stack.put(f"{key.id}/i.png", photo(11))
    body = {"input": uri}
    with api_stack.client(token) as http, client_to(replica.url, token) as other:
        first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
        assert first.status_code == 202, first.text
        again = other.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
        assert again.status_code == 202
        assert again.content == first.content  # the same answer, byte for byte
        assert again.headers["location"] == first.headers["location"]
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert "ratelimit" in again.headers  # the replay is still an authenticated answer
        # the draft's sf-string form names the same key
        quoted = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": '"order-1"'})
        assert quoted.json()["id"] == first.json()["id"]
        # another body with the key: 422; another key: another job
        other_body = http.post(
            "/v1/jobs", json={"input": uri, "mask": True}, headers={"Idempotency-Key": "order-1"}
        )
        problem(other_body, 422, "idempotency_key_mismatch")
        fresh = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-2"})
        assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
        jobs = http.get("/v1/jobs").json()["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted([first.json()["id"], fresh.json()["id"]])
    # keys are per tenant: another key's same Idempotency-Key is its own request
    _, token_b = api_stack.key("idem-b")
    uri_b = api_stack.put(f"{key.id}-b/i.png", photo(11))
    with api_stack.client(token_b) as http:
        answer = http.post(
            "/v1/jobs", json={"input": uri_b}, headers={"Idempotency-Key": "order-1"}
        )
        assert answer.status_code == 202 and answer.json()["id"] != first.json()["id"]
    stored = redis.Redis.from_url(api_stack.redis_url)
    try:
        names = [n.decode() for n in stored.scan_iter(f"ben2q:idem:{key.id}:*")]
        assert len(names) == 2 and all(len(n.rsplit(":", 1)[1]) == 64 for n in names)
        assert 0 < stored.ttl(names[0]) <= 24 * 3600
    finally:
        stored.close()


def test_idempotent_wait_answer_is_repeated(api_stack):
    key, token = api_stack.key("idem-wait")
    uri = api_stack.put(f"{key.id}/w.png", photo(12))
    headers = {"Idempotency-Key": "wait-1", "Prefer": "wait=30"}
    with api_stack.client(token) as http:
        first = http.post("/v1/jobs", json={"input": uri}, headers=headers)
        assert first.status_code == 201 and first.json()["state"] == "succeeded", first.text
        again = http.post("/v1/jobs", json={"input": uri}, headers=headers)
        assert again.status_code == 201 and again.content == first.content
        assert again.headers["preference-applied"] == "wait=30"


def test_idempotent_upload_is_fingerprinted_as_it_streams(api_stack):
    key, token = api_stack.key("idem-upload")
    with api_stack.client(token) as http:
        request = http.build_request(
            "POST", "/v1/jobs", files=[("file", ("a.png", photo(21), "image/png"))]
        )
        body = request.read()  # one serialized request (one boundary), sent again on retry
        headers = {"Content-Type": request.headers["content-type"], "Idempotency-Key": "up-1"}
        first = http.post("/v1/jobs", content=body, headers=headers)
        assert first.status_code == 202, first.text
        again = http.post("/v1/jobs", content=body, headers=headers)
        assert again.status_code == 202 and again.content == first.content
        other = http.post(
            "/v1/jobs",
            files=[("file", ("a.png", photo(21), "image/png"))],
            headers={"Idempotency-Key": "up-1"},
        )  # the same file under another boundary is another byte sequence
        problem(other, 422, "idempotency_key_mismatch")
        assert len(http.get("/v1/jobs").json()["jobs"]) == 1


def test_idempotent_remove_remakes_the_image_answer(api_stack, replica):
    key, token = api_stack.key("idem-remove")
    uri = api_stack.put(f"{key.id}/r.png", photo(19))
    image = photo(20)
    with api_stack.client(token) as http, client_to(replica.url, token) as other:
        first = http.post("/v1/remove", json={"input": uri}, headers={"Idempotency-Key": "rm-1"})
        assert first.status_code == 200, first.text
        again = other.post("/v1/remove", json={"input": uri}, headers={"Idempotency-Key": "rm-1"})
        assert again.status_code == 200 and again.content == first.content
        assert again.headers["x-job-id"] == first.headers["x-job-id"]
        moved = http.post(
            "/v1/remove?mask=true", json={"input": uri}, headers={"Idempotency-Key": "rm-1"}
        )
        problem(moved, 422, "idempotency_key_mismatch")  # the query is part of the request
        # an uploaded body is fingerprinted as it streams (never buffered for it)
        raw = {"Idempotency-Key": "rm-2", "Content-Type": "image/png"}
        up = http.post("/v1/remove", content=image, headers=raw)
        assert up.status_code == 200, up.text
        up_again = other.post("/v1/remove", content=image, headers=raw)
        assert up_again.headers["x-job-id"] == up.headers["x-job-id"]
        assert up_again.content == up.content
        changed = http.post("/v1/remove", content=image[:-1] + b"\0", headers=raw)
        problem(changed, 422, "idempotency_key_mismatch")
        jobs = http.get("/v1/jobs").json()["jobs"]
        assert len(jobs) == 2


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"a\tb",
        b"x" * 256,
        b'"' + b"x" * 256 + b'"',
        b"caf\xc3\xa9",
        b'"a\\b"',
        b'"open',
    ],
)
def test_malformed_idempotency_key_is_400(api_stack, value):
    key, token = api_stack.key("idem-bad")
    uri = api_stack.put(f"{key.id}/b.png", photo(13))
    with api_stack.client(token) as http:
        answer = http.post("/v1/jobs", json={"input": uri}, headers={"Idempotency-Key": value})
        problem(answer, 400, "idempotency_key_invalid")
        assert http.get("/v1/jobs").json()["jobs"] == []
        two = http.post(
            "/v1/jobs",
            json={"input": uri},
            headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        )
        problem(two, 400, "idempotency_key_invalid")
        ok = http.post("/v1/jobs", json={"input": uri}, headers={"Idempotency-Key": "x" * 255})
        assert ok.status_code == 202


def test_failed_request_frees_the_key(api_stack):
    key, token = api_stack.key("idem-fail")
    uri = api_stack.put(f"{key.id}/f.png", photo(14))
    with api_stack.client(token) as http:
        bad = http.post(
            "/v1/jobs", json={"input": uri, "format": "gif"}, headers={"Idempotency-Key": "k"}
        )
        problem(bad, 422, "invalid_request")
        outside = http.post(
            "/v1/jobs", json={"input": "s3://api-other/x.png"}, headers={"Idempotency-Key": "k"}
        )
        problem(outside, 403, "forbidden")
        fixed = http.post("/v1/jobs", json={"input": uri}, headers={"Idempotency-Key": "k"})
        assert fixed.status_code == 202, fixed.text
        again = http.post("/v1/jobs", json={"input": uri}, headers={"Idempotency-Key": "k"})
        assert again.json()["id"] == fixed.json()["id"]


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode("latin-1") + b"\r\n" + body)
    return sock


def test_request_in_flight_is_409_until_it_ends(api_stack, replica):
    key, token = api_stack.key("idem-flight")
    uri = api_stack.put(f"{key.id}/s.png", photo(15))
    body = f'{{"input": "{uri}"}}'.encode()
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: slow-1\r\nContent-Length: {len(body)}\r\n"
    )
    slow = raw_request(api_stack.api.port, head, body[:5])  # the rest never comes (yet)
    try:
        with client_to(replica.url, token) as http:
            deadline = time.monotonic() + 10
            while True:  # until the slow request holds the key
                answer = http.post(
                    "/v1/jobs",
                    content=body,
                    headers={"Idempotency-Key": "slow-1", "Content-Type": "application/json"},
                )
                if answer.status_code == 409 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            problem(answer, 409, "idempotency_key_in_use")
            assert answer.headers["retry-after"] == "1"
            slow.sendall(body[5:])
            reply = slow.recv(65536)
            assert reply.startswith(b"HTTP/1.1 202"), reply[:200]
            again = http.post(
                "/v1/jobs",
                content=body,
                headers={"Idempotency-Key": "slow-1", "Content-Type": "application/json"},
            )
            assert again.status_code == 202
            assert again.json()["id"].encode() in reply
    finally:
        slow.close()
    # a client that goes away mid-body frees the key at once (no job was made)
    slow = raw_request(api_stack.api.port, head.replace("slow-1", "slow-2"), body[:5])
    time.sleep(0.3)
    slow.close()
    with api_stack.client(token) as http:
        deadline = time.monotonic() + 10
        while True:
            answer = http.post(
                "/v1/jobs",
                content=body,
                headers={"Idempotency-Key": "slow-2", "Content-Type": "application/json"},
            )
            if answer.status_code != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer.status_code == 202, answer.text
        assert len(http.get("/v1/jobs").json()["jobs"]) == 2
    assert api_stack.api.alive()


def test_two_replicas_at_once_make_one_job(api_stack, replica):
    key, token = api_stack.key("idem-race")
    uri = api_stack.put(f"{key.id}/r.png", photo(16))
    for round_ in range(3):
        n = 12
        barrier = threading.Barrier(n)
        answers: list = [None] * n

        def send(i: int, barrier=barrier, answers=answers, name=f"race-{round_}") -> None:
            url = api_stack.url if i % 2 else replica.url
            with client_to(url, token) as http:
                barrier.wait()
                answers[i] = http.post(
                    "/v1/jobs", json={"input": uri}, headers={"Idempotency-Key": name}
                )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(a.status_code for a in answers)
        assert set(codes) <= {202, 409}, codes
        made = {a.json()["id"] for a in answers if a.status_code == 202}
        assert len(made) == 1, codes
        for a in answers:
            if a.status_code == 409:
                problem(a, 409, "idempotency_key_in_use")
    with api_stack.client(token) as http:
        assert len(http.get("/v1/jobs").json()["jobs"]) == 3


# --- rate limits ----------------------------------------------------------------------


def test_request_limit_headers_and_429_shared_by_replicas(api_stack, replica):
    key, token = api_stack.key("rate", rate_requests=5)
    fresh_window()
    remaining = []
    with api_stack.client(token) as a, client_to(replica.url, token) as b:
        answers = [
            a.get("/v1/jobs"),
            b.get("/v1/jobs/nope"),
            a.get("/v1/jobs", params={"limit": 0}),
        ]
        answers += [b.post("/v1/jobs", json={}), a.get("/v1/jobs")]
        assert [r.status_code for r in answers] == [200, 404, 422, 422, 200]
        for answer in answers:  # success and error answers alike
            assert items(answer.headers["ratelimit-policy"]) == {"requests": {"q": "5", "w": "60"}}
            limit = items(answer.headers["ratelimit"])["requests"]
            remaining.append(int(limit["r"]))
            assert 0 < int(limit["t"]) <= WINDOW
        assert remaining == [4, 3, 2, 1, 0]
        for http in (a, b):  # over the limit on both replicas
            over = problem(http.get("/v1/jobs"), 429, "rate_limited")
            assert "5 requests" in over["detail"]
        over = b.get("/v1/jobs")
        retry = int(over.headers["retry-after"])
        assert 0 < retry <= WINDOW
        assert items(over.headers["ratelimit"])["requests"] == {"r": "0", "t": str(retry)}
    with api_stack.client() as anonymous:  # not authenticated: no key, no limit to show
        assert "ratelimit" not in anonymous.get("/v1/jobs").headers


def test_image_limit_counts_a_batch(api_stack):
    key, token = api_stack.key("rate-img", rate_images=3)
    uri = api_stack.put(f"{key.id}/n.png", photo(17))
    fresh_window()
    with api_stack.client(token) as http:
        batch = http.post("/v1/jobs", json={"inputs": [uri] * 4})
        body = problem(batch, 429, "rate_limited")
        assert "3 images" in body["detail"] and batch.headers["retry-after"]
        policy = items(batch.headers["ratelimit-policy"])
        assert policy["images"] == {"q": "3", "w": "60"} and "requests" in policy
        assert items(batch.headers["ratelimit"])["images"]["r"] == "3"  # nothing was taken
        two = http.post("/v1/jobs", json={"inputs": [uri] * 2})
        assert two.status_code == 202 and items(two.headers["ratelimit"])["images"]["r"] == "1"
        one = http.post("/v1/jobs", json={"input": uri})
        assert one.status_code == 202 and items(one.headers["ratelimit"])["images"]["r"] == "0"
        problem(http.post("/v1/jobs", json={"input": uri}), 429, "rate_limited")
        assert len(http.get("/v1/jobs").json()["jobs"]) == 2


# --- back-pressure and CORS -----------------------------------------------------------


def test_back_pressure_is_503_overloaded(api_stack, extra_api):
    queue = "bp-test"
    server = extra_api("backpressure", BEN2Q_QUEUE=queue, BEN2Q_API_MAX_QUEUED="2")
    broker = redis.Redis.from_url(api_stack.redis_url)
    broker.delete(queue)
    key, token = api_stack.key("bp")
    uri = api_stack.put(f"{key.id}/q.png", photo(18))
    try:
        with client_to(server.url, token) as http:
            codes = [http.post("/v1/jobs", json={"input": uri}).status_code for _ in range(3)]
            assert codes == [202, 202, 202]  # 0, 1, 2 queued: not over the bound yet
            assert broker.llen(queue) == 3
            over = http.post("/v1/jobs", json={"input": uri}, headers={"Idempotency-Key": "bp"})
            body = problem(over, 503, "overloaded")
            assert "3 jobs" in body["detail"] and int(over.headers["retry-after"]) > 0
            assert "ratelimit" in over.headers
            broker.delete(queue)  # drained: the same key may now go through
            again = http.post("/v1/jobs", json={"input": uri}, headers={"Idempotency-Key": "bp"})
            assert again.status_code == 202
            assert http.get("/readyz").status_code in (200, 503)
    finally:
        broker.delete(queue)
        broker.close()


def test_readiness_waits_for_the_workers_it_is_told_to(api_stack, extra_api):
    """``BEN2Q_API_READY_MIN_WORKERS``: 1 by default; 0 for a fleet scaled to zero, whose
    API must take jobs before any worker exists (deploy/kubernetes)."""
    empty = api_stack.redis_url.rsplit("/", 1)[0] + "/2"  # a database no worker beats in
    redis.Redis.from_url(empty).flushdb()
    lonely = extra_api("ready-default", BEN2Q_BROKER_URL=empty)
    scaled = extra_api("ready-zero", BEN2Q_BROKER_URL=empty, BEN2Q_API_READY_MIN_WORKERS="0")
    many = extra_api("ready-many", BEN2Q_API_READY_MIN_WORKERS="50")
    with client_to(lonely.url) as http:
        body = problem(http.get("/readyz"), 503, "unavailable")
        assert "no image worker" in body["detail"]
    with client_to(scaled.url) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] == 0
    with client_to(many.url) as http:  # the stack's worker beats, but 1 is fewer than 50
        assert "fewer than 50" in problem(http.get("/readyz"), 503, "unavailable")["detail"]


def test_cors_only_for_configured_origins(api_stack, extra_api):
    server = extra_api("cors", BEN2Q_API_CORS_ORIGINS='["https://app.example"]')
    _, token = api_stack.key("cors")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    with client_to(server.url) as http:
        ok = http.options("/v1/jobs", headers={"Origin": "https://app.example", **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        allowed = ok.headers["access-control-allow-headers"].lower()
        assert "idempotency-key" in allowed and "authorization" in allowed
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert ok.headers["access-control-max-age"] == "600"
        denied = http.options("/v1/jobs", headers={"Origin": "https://evil.example", **preflight})
        assert denied.status_code >= 400
        assert "access-control-allow-origin" not in denied.headers
        auth = {"Authorization": f"Bearer {token}"}
        simple = http.get("/v1/jobs", headers={"Origin": "https://app.example", **auth})
        assert simple.status_code == 200
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        exposed = simple.headers["access-control-expose-headers"].lower()
        assert "ratelimit" in exposed and "location" in exposed and "retry-after" in exposed
        # errors carry CORS too, so a browser app can read the problem
        no_key = http.get("/v1/jobs", headers={"Origin": "https://app.example"})
        assert no_key.status_code == 401
        assert no_key.headers["access-control-allow-origin"] == "https://app.example"
        other = http.get("/v1/jobs", headers={"Origin": "https://evil.example", **auth})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    # the default deployment allows no origin
    with api_stack.client() as http:
        answer = http.options("/v1/jobs", headers={"Origin": "https://app.example", **preflight})
        assert "access-control-allow-origin" not in answer.headers
        assert answer.status_code == 405
        assert answer.headers["content-type"].startswith("application/problem+json")
        simple = http.get("/v1/jobs", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in simple.headers
