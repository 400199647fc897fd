"""Security of the HTTP API, end to end: tenant isolation, scopes of inputs and outputs,
SSRF at submit, and hostile HTTP input against a real ``ben2q api`` process (uvicorn over a
socket), with a real worker, redis-server and SeaweedFS behind it."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from apistack import ApiServer, photo, problem, wait_done

REFUSALS = {403: "forbidden", 422: "invalid_request"}


@pytest.fixture(scope="module", autouse=True)
def no_internal_errors(api_stack):
    """No request of this module may make the API answer 500 (it logs each one)."""
    log = api_stack.logs / "api.log"
    start = log.stat().st_size
    yield
    text = log.read_bytes()[start:].decode("utf-8", "replace")
    assert "internal error" not in text, text[-3000:]
    assert api_stack.api.alive()


@pytest.fixture(scope="module")
def replica(api_stack):
    server = ApiServer(api_stack.env, api_stack.logs / "replica-security.log").start()
    yield server
    server.stop()


def client_to(url: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def refused(answer: httpx.Response) -> dict:
    """A 403 (scope) or 422 (malformed) problem: never a job, never a 5xx."""
    assert answer.status_code in REFUSALS, (answer.status_code, answer.text)
    return problem(answer, answer.status_code, answer.json()["code"])


# --- tenant isolation -----------------------------------------------------------------


def test_a_key_never_sees_another_keys_jobs(api_stack, replica):
    key_a, token_a = api_stack.key("tenant-a")
    key_b, token_b = api_stack.key("tenant-b")
    uri = api_stack.put(f"{key_b.id}/b.png", photo(21))
    with api_stack.client(token_b) as b:
        job = b.post("/v1/jobs", json={"inputs": [uri] * 3}).json()
    paths = httpx.get(api_stack.url + "/openapi.json").json()["paths"]
    job_paths = [p for p in paths if "{job_id}" in p]
    assert "/v1/jobs/{job_id}" in job_paths and "/v1/jobs/{job_id}/cancel" in job_paths
    for url in (api_stack.url, replica.url):
        with client_to(url, token_a) as a:
            for path in job_paths:  # every job route, present and future (events, outputs)
                for method in paths[path]:
                    target = re.sub(r"\{[a-z_]+\}", "0", path.replace("{job_id}", job["id"]))
                    answer = a.request(method, target, timeout=10)
                    problem(answer, 404, "not_found")  # 404, not 403: ids are not probeable
                    assert job["id"] not in answer.text or "no job" in answer.text
            assert a.get("/v1/jobs").json()["jobs"] == []
            assert a.get("/v1/jobs", params={"state": "queued"}).json()["jobs"] == []
    with api_stack.client(token_b) as b:
        record = wait_done(b, job["id"])
        assert record["state"] != "cancelled" and record["tenant"] == key_b.id
        assert all(
            item["output"].startswith(f"s3://api-out/{key_b.id}/") for item in record["items"]
        )
    assert key_a.id != key_b.id


def test_inputs_outside_the_keys_prefixes_are_refused(api_stack):
    key, token = api_stack.key("scoped-in", input_prefixes=[f"s3://api-in/{'p' * 4}/"])
    root = api_stack.root
    inside = api_stack.put("pppp/ok.png", photo(22))
    api_stack.put("pppq/x.png", photo(22))
    api_stack.put("pppp/x.png", photo(22), bucket="api-other")
    bad = [
        "s3://api-other/pppp/x.png",
        "s3://api-in/pppq/x.png",
        "s3://api-in/pppp/../pppq/x.png",
        "s3://api-in/pppp/%2e%2e/pppq/x.png",
        "s3://api-in/pppp%2f..%2fpppq/x.png",
        "s3://api-in/pppp/..%2Fpppq/x.png",
        "s3://api-in/pppp\\..\\pppq/x.png",
        "s3://api-in/ppp%70/x.png",
        "s3://api-in/pppp/x.png?/../../pppq/x.png",
        "s3://api-other@api-in/pppp/x.png",
        f"file://{root}/in/a.png",
        f"file://{root}/in/../in/a.png",
        f"file://{root}/in/%2e%2e/a.png",
        "file:///etc/passwd",
        "http://example.com/pppp/x.png",
        "https://example.com:99999/x.png",
        "https://[::1/x.png",
    ]
    with api_stack.client(token) as http:
        for uri in bad:
            body = refused(http.post("/v1/jobs", json={"input": uri}))
            assert body["errors"][0]["pointer"] == "/input", (uri, body)
            body = refused(http.post("/v1/jobs", json={"inputs": [inside, uri]}))
            assert body["errors"][0]["pointer"] == "/inputs/1", (uri, body)
        assert http.get("/v1/jobs").json()["jobs"] == []
        ok = http.post("/v1/jobs", json={"input": inside})
        assert ok.status_code == 202, ok.text
    closed, token = api_stack.key("no-urls", allow_urls=False)
    with api_stack.client(token) as http:
        body = problem(
            http.post("/v1/jobs", json={"input": "https://example.com/a.png"}), 403, "forbidden"
        )
        assert "no URLs" in body["detail"]


def test_outputs_outside_the_keys_prefix_are_refused(api_stack):
    key, token = api_stack.key("scoped-out")
    other, _ = api_stack.key("someone-else")
    uri = api_stack.put(f"{key.id}/o.png", photo(23))
    bad = [
        "..",
        "../" + other.id,
        "run/../../" + other.id,
        "run%2f..%2fx",
        "run/%2e%2e/x",
        "run\\..\\x",
        "s3://api-other/",
        f"s3://api-other/{key.id}/",
        f"s3://api-out/{other.id}/",
        f"s3://api-out/{key.id}/../{other.id}/",
        f"s3://api-out/{key.id}/%2e%2e/{other.id}/",
        "file:///etc/",
        f"file://{api_stack.root}/out/",
        "https://example.com/out/",
    ]
    with api_stack.client(token) as http:
        for output in bad:
            body = refused(http.post("/v1/jobs", json={"input": uri, "output": output}))
            assert body["errors"][0]["pointer"] == "/output", (output, body)
        ok = http.post("/v1/jobs", json={"input": uri, "output": "catalog/2026"})
        assert ok.json()["output"] == f"s3://api-out/{key.id}/catalog/2026/"
        done = wait_done(http, ok.json()["id"])
        assert done["items"][0]["output"].startswith(f"s3://api-out/{key.id}/catalog/2026/")


def test_file_inputs_only_under_a_file_prefix(api_stack):
    root: Path = api_stack.root
    (root / "in").mkdir(exist_ok=True)
    (root / "in" / "f.png").write_bytes(photo(24))
    (root / "secret.png").write_bytes(photo(25))
    key, token = api_stack.key("files", input_prefixes=[f"file://{root}/in/"])
    with api_stack.client(token) as http:
        ok = http.post("/v1/jobs", json={"input": f"file://{root}/in/f.png"})
        assert ok.status_code == 202, ok.text
        assert wait_done(http, ok.json()["id"])["state"] == "succeeded"
        for uri in (
            f"file://{root}/secret.png",
            f"file://{root}/in/../secret.png",
            f"file://{root}/in/%2e%2e/secret.png",
            f"file://{root}/in%2f..%2fsecret.png",
            f"file://localhost{root}/secret.png",
            "file:///etc/passwd",
        ):
            refused(http.post("/v1/jobs", json={"input": uri}))


def test_revoked_key_is_refused_at_once_on_every_replica(api_stack, replica):
    key, token = api_stack.key("revoked")
    with api_stack.client(token) as a, client_to(replica.url, token) as b:
        assert a.get("/v1/jobs").status_code == 200 and b.get("/v1/jobs").status_code == 200
        api_stack.revoke(key.id)
        problem(a.get("/v1/jobs"), 401, "unauthorized")
        problem(b.get("/v1/jobs"), 401, "unauthorized")


def test_ssrf_private_addresses_refused_at_submit(api_stack):
    server = ApiServer(
        {**api_stack.env, "BEN2Q_ALLOW_PRIVATE_URLS": "false"}, api_stack.logs / "ssrf.log"
    ).start()
    key, token = api_stack.key("ssrf")
    good = api_stack.put(f"{key.id}/g.png", photo(26))
    hosts = [
        "https://127.0.0.1/x.png",
        "https://127.1/x.png",
        "https://2130706433/x.png",
        "https://169.254.169.254/latest/meta-data/iam/x.png",
        "https://localhost/x.png",
        "https://localhost:8443/x.png",
        "https://[::1]/x.png",
        "https://[::ffff:127.0.0.1]/x.png",
        "https://10.0.0.1/x.png",
        "https://0.0.0.0/x.png",
    ]
    try:
        with client_to(server.url, token) as http:
            for url in hosts:
                answer = http.post("/v1/jobs", json={"input": url})
                assert answer.status_code == 422, (url, answer.text)
                assert answer.json()["code"] in ("forbidden_url", "fetch_failed"), answer.text
                hook = http.post("/v1/jobs", json={"input": good, "webhook_url": url})
                assert hook.status_code == 422, (url, hook.text)
                assert hook.json()["errors"][0]["pointer"] == "/webhook_url"
            assert http.get("/v1/jobs").json()["jobs"] == []
    finally:
        server.stop()
    assert "internal error" not in (api_stack.logs / "ssrf.log").read_text()


# --- hostile HTTP ---------------------------------------------------------------------


def exchange(port: int, data: bytes, *, close_after: bool = False, wait: float = 5) -> bytes:
    """Send raw bytes; what the server answers before it closes or ``wait`` passes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    try:
        sock.sendall(data)
        if close_after:
            return b""
        chunks = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)
    finally:
        sock.close()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    return match is None or len(body) >= int(match.group(1))


def status_of(reply: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3})", reply)
    return int(match.group(1)) if match else None


def still_alive(api_stack) -> None:
    assert api_stack.api.alive()
    assert httpx.get(api_stack.url + "/healthz", timeout=5).status_code == 200


def test_hostile_bodies_are_problems(api_stack):
    key, token = api_stack.key("hostile")
    uri = api_stack.put(f"{key.id}/h.png", photo(27))
    json_type = {"Content-Type": "application/json"}
    with api_stack.client(token) as http:
        cases = [
            (b'{"input": ', json_type, 422, "invalid_request"),
            (b"", json_type, 422, "invalid_request"),
            (b"null", json_type, 422, "invalid_request"),
            (b"[1, 2]", json_type, 422, "invalid_request"),
            (b'{"input": NaN}', json_type, 422, "invalid_request"),
            (b'{"input": "a", "input": 1e999}', json_type, 422, "invalid_request"),
            (b"\xff\xfe{\x00}\x00", json_type, 422, "invalid_request"),
            ('{"input": "caf\u00e9"}'.encode("latin-1"), json_type, 422, "invalid_request"),
            (b'{"input": "s3://api-in/a\\u0000.png"}', json_type, 422, "invalid_request"),
            (b"[" * 100_000 + b"]" * 100_000, json_type, None, None),
            (b'{"a": ' * 3000 + b"1" + b"}" * 3000, json_type, 422, "invalid_request"),
            (b'{"input": "' + b"x" * (1024 * 1024) + b'"}', json_type, 413, "payload_too_large"),
            (b"input=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
            (b"<x/>", {"Content-Type": "application/xml"}, 415, "unsupported_media_type"),
            (b'{"input": "x"}', {"Content-Type": ""}, 415, "unsupported_media_type"),
        ]
        for body, headers, status, code in cases:
            answer = http.post("/v1/jobs", content=body, headers=headers)
            assert 400 <= answer.status_code < 500, (body[:40], answer.status_code, answer.text)
            problem(answer, status or answer.status_code, code or answer.json()["code"])

        # a body streamed in chunks with no Content-Length is bounded as it arrives
        def chunks():
            for _ in range(64):
                yield b"x" * 65536

        big = http.post("/v1/jobs", content=chunks(), headers=json_type)
        problem(big, 413, "payload_too_large")
        put = problem(http.put("/v1/jobs", json={"input": uri}), 405, "method_not_allowed")
        assert http.put("/v1/jobs").headers["allow"] == "GET, POST", put
        problem(http.get("/v1/nothing-here"), 404, "not_found")
        problem(http.get("/v1/jobs", params={"limit": "1e9"}), 422, "invalid_request")
        problem(
            http.post("/v1/jobs", json={"input": uri}, headers={"Prefer": "wait=" + "9" * 300}),
            422,
            "invalid_request",
        )
        weird = http.get("/v1/jobs", headers={"Authorization": b"Bearer \xff\xfe"})
        problem(weird, 401, "unauthorized")
        assert http.get("/v1/jobs").json()["jobs"] == []
    still_alive(api_stack)


def test_hostile_connections_leave_the_api_serving(api_stack):
    _, token = api_stack.key("hostile-conn")
    port = api_stack.api.port
    auth = f"Authorization: Bearer {token}\r\n"
    # many headers
    many = "".join(f"X-H{i}: {i}\r\n" for i in range(5000)).encode()
    reply = exchange(port, b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status_of(reply) in (None, 400, 401, 413, 431), reply[:200]
    # a Content-Length that promises more than comes, then the client leaves
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
    exchange(
        port,
        (head + "Content-Length: 1000\r\n\r\n").encode() + b'{"input": "s3://',
        close_after=True,
    )
    # a Content-Length shorter than the body: the body ends where it says (invalid JSON)
    body = b'{"input": "s3://api-in/x.png"}'
    reply = exchange(
        port, (head + "Content-Length: 10\r\nConnection: close\r\n\r\n").encode() + body
    )
    assert status_of(reply) == 422, reply[:300]
    assert b"application/problem+json" in reply
    # Content-Length and Transfer-Encoding together (smuggling): refused by the HTTP layer
    reply = exchange(
        port,
        (head + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + b"0\r\n\r\n",
    )
    assert status_of(reply) in (None, 400, 422), reply[:300]
    # a bad Content-Length
    reply = exchange(port, (head + "Content-Length: -5\r\n\r\n").encode())
    assert status_of(reply) in (None, 400), reply[:300]
    # slowloris: a head that trickles in, and a body that stalls, then both leave
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        for i, sock in enumerate(slow):
            if i % 2:
                sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n")
            else:
                sock.sendall((head + "Content-Length: 100\r\n\r\n").encode() + b"{")
        for _ in range(3):
            for sock in slow[1::2]:
                sock.sendall(b"X: y\r\n")
            still_alive(api_stack)  # others are served meanwhile
            time.sleep(0.2)
    finally:
        for sock in slow:
            sock.close()
    # a garbage request line
    reply = exchange(port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 100)
    assert status_of(reply) in (None, 400), reply[:200]
    still_alive(api_stack)
    with api_stack.client(token) as http:
        assert http.get("/v1/jobs").status_code == 200


def test_huge_header_is_refused(api_stack):
    """A 100 KB header is refused by the HTTP layer (400/431) or the connection closed."""
    reply = exchange(
        api_stack.api.port,
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    )
    still_alive(api_stack)
    assert status_of(reply) == 431, reply[:200]
    assert b"application/problem+json" in reply and b"request_header_too_large" in reply


def test_endless_header_is_cut_off_without_reading_it(api_stack):
    """A header that never ends (50 MB offered) is refused after the bound: the server
    answers 431 and closes long before the client could send it all, and stays alive."""
    import socket

    with socket.create_connection(("127.0.0.1", api_stack.api.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        chunk = b"a" * 65536
        with pytest.raises(OSError):  # broken pipe / reset once the server closed
            while sent < 50_000_000:
                sock.sendall(chunk)
                sent += len(chunk)
        assert sent < 10_000_000
    still_alive(api_stack)


def test_a_slow_head_is_timed_out(api_stack, tmp_path):
    """A head trickling in (slowloris) is closed after the head timeout; others are served."""
    import socket

    from ben2q.api import serve

    assert serve.HEAD_TIMEOUT <= 30
    with socket.create_connection(("127.0.0.1", api_stack.api.port), timeout=60) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < serve.HEAD_TIMEOUT + 10:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            with api_stack.client() as http:
                assert http.get("/healthz").status_code == 200
            time.sleep(2)
        assert closed, "the slow head was never cut off"
        assert time.monotonic() - started >= serve.HEAD_TIMEOUT - 1
