"""The HTTP API's jobs resource, end to end: a real ``ben2q api`` process, a real worker,
redis-server and SeaweedFS, driven over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from apistack import photo, problem, wait_done
from PIL import Image
from stack import ROOT


def test_probes(api_stack):
    with httpx.Client(base_url=api_stack.url) as http:
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["workers"] >= 1


def test_no_or_bad_key_is_401(api_stack):
    _, token = api_stack.key("auth")
    with api_stack.client() as http:
        body = problem(http.get("/v1/jobs"), 401, "unauthorized")
        assert "Bearer" in body["detail"]
        assert http.get("/v1/jobs").headers["www-authenticate"].startswith("Bearer")
        for bad in ("Bearer nope", "Basic dXNlcjpwYXNz", "Bearer " + token[:-1] + "x"):
            problem(http.get("/v1/jobs", headers={"Authorization": bad}), 401, "unauthorized")
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_submit_get_and_output(api_stack):
    key, token = api_stack.key("submit")
    uri = api_stack.put(f"{key.id}/a.png", photo(1))
    with api_stack.client(token) as http:
        created = http.post("/v1/jobs", json={"input": uri, "mask": True})
        assert created.status_code == 202, created.text
        record = created.json()
        assert created.headers["location"] == f"/v1/jobs/{record['id']}"
        assert record["state"] == "queued" and record["tenant"] == key.id
        assert record["output"] == f"s3://api-out/{key.id}/"
        assert record["expires_at"] == pytest.approx(record["created_at"] + 86400, abs=5)
        done = wait_done(http, record["id"])
    assert done["state"] == "succeeded", done
    item = done["items"][0]
    assert item["output"].startswith(f"s3://api-out/{key.id}/{record['id']}/")
    out = Image.open(__import__("io").BytesIO(api_stack.read(item["output"])))
    assert out.mode == "RGBA" and out.size == (64, 48)


def test_prefer_wait_finishes_and_times_out(api_stack):
    key, token = api_stack.key("wait")
    uri = api_stack.put(f"{key.id}/w.png", photo(2))
    with api_stack.client(token) as http:
        started = time.monotonic()
        answer = http.post("/v1/jobs", json={"input": uri}, headers={"Prefer": "wait=30"})
        assert answer.status_code == 201, answer.text
        assert answer.headers["preference-applied"] == "wait=30"
        assert answer.json()["state"] == "succeeded"
        assert time.monotonic() - started < 30
        # a job that cannot end in time: its input is slow to fetch (a cancelled worker
        # would be simpler, but the worker is shared); wait=1 answers the queued record
        missing = api_stack.put(f"{key.id}/m.png", photo(3))
        answer = http.post("/v1/jobs", json={"inputs": [missing] * 8}, headers={"Prefer": "wait=0"})
        assert answer.status_code == 201
        assert answer.headers["preference-applied"] == "wait=0"
        assert answer.json()["state"] in ("queued", "running")
        capped = http.post("/v1/jobs", json={"input": uri}, headers={"Prefer": "wait=999"})
        assert capped.headers["preference-applied"] == "wait=60"


def test_list_paginates_newest_first_and_filters(api_stack):
    key, token = api_stack.key("lister")
    uri = api_stack.put(f"{key.id}/l.png", photo(4))
    with api_stack.client(token) as http:
        ids = [http.post("/v1/jobs", json={"input": uri}).json()["id"] for _ in range(5)]
        bad = http.post("/v1/jobs", json={"input": f"s3://api-in/{key.id}/none.png"}).json()
        for job_id in [*ids, bad["id"]]:
            wait_done(http, job_id)
        seen, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = http.get("/v1/jobs", params=params).json()
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == [bad["id"], *reversed(ids)]
        failed = http.get("/v1/jobs", params={"state": "failed"}).json()
        assert [job["id"] for job in failed["jobs"]] == [bad["id"]]
        assert failed["jobs"][0]["error"]["code"] == "not_found"
        problem(http.get("/v1/jobs", params={"state": "bogus"}), 422, "invalid_request")
        problem(http.get("/v1/jobs", params={"cursor": "!!"}), 422, "invalid_request")
        problem(http.get("/v1/jobs", params={"limit": 0}), 422, "invalid_request")


def test_cancel(api_stack):
    key, token = api_stack.key("canceller")
    uri = api_stack.put(f"{key.id}/c.png", photo(5))
    with api_stack.client(token) as http:
        job = http.post("/v1/jobs", json={"inputs": [uri] * 40}).json()
        answer = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert answer.status_code == 200
        final = wait_done(http, job["id"])
        assert final["state"] == "cancelled" or (
            final["state"] in ("partial", "succeeded")
            and any(item["state"] == "cancelled" for item in final["items"])
            or final["state"] == "cancelled"
        )
        problem(http.post("/v1/jobs/nope/cancel"), 404, "not_found")


def test_a_batch_s_items_are_paged_and_served(api_stack):
    """A batch of more than 16 keeps its items apart: the record is assembled up to 1,000
    items, ``/items`` pages them with a cursor, outputs are served by index."""
    key, token = api_stack.key("pager")
    _, other = api_stack.key("pager-other")
    uris = [api_stack.put(f"{key.id}/p{i}.png", photo(10 + i)) for i in range(4)]
    with api_stack.client(token) as http:
        job = http.post("/v1/jobs", json={"inputs": uris * 10}).json()
        assert job["items_apart"] and job["counts"]["total"] == 40 and len(job["items"]) == 40
        done = wait_done(http, job["id"], timeout=120)
        assert done["state"] == "succeeded" and done["counts"]["succeeded"] == 40
        assert [item["index"] for item in done["items"]] == list(range(40))
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 15, **({"cursor": cursor} if cursor else {})}
            page = http.get(f"/v1/jobs/{job['id']}/items", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            assert body["total"] == 40
            seen += body["items"]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and [item["index"] for item in seen] == list(range(40))
        assert seen == done["items"]
        assert http.get(f"/v1/jobs/{job['id']}/items/37/output").status_code == 302
        problem(http.get(f"/v1/jobs/{job['id']}/items/40/output"), 404, "not_found")
        bad = http.get(f"/v1/jobs/{job['id']}/items", params={"cursor": "x1"})
        problem(bad, 422, "invalid_request", "/query:cursor")
        # beyond 1,000 items the record is the summary: its items are only paged
        big = http.post("/v1/jobs", json={"inputs": uris * 251}, headers={"Prefer": "wait=0"})
        assert big.status_code == 201, big.text
        record = http.get(f"/v1/jobs/{big.json()['id']}").json()
        assert record["items"] == [] and record["counts"]["total"] == 1004
        page = http.get(f"/v1/jobs/{big.json()['id']}/items", params={"cursor": "1000"}).json()
        assert [item["index"] for item in page["items"]] == [1000, 1001, 1002, 1003]
        assert page["next_cursor"] is None
        http.post(f"/v1/jobs/{big.json()['id']}/cancel")
    with api_stack.client(other) as http:  # another key cannot page them
        problem(http.get(f"/v1/jobs/{job['id']}/items"), 404, "not_found")


def test_a_prefix_job_within_the_key_s_scope(api_stack):
    key, token = api_stack.key("prefixer")
    for i in range(6):
        api_stack.put(f"{key.id}/cat/{i}.png", photo(30 + i))
    api_stack.put(f"{key.id}/cat/notes.txt", b"not an image")
    narrow, narrow_token = api_stack.key("narrow", input_prefixes=[f"s3://api-in/{key.id}/"])
    with api_stack.client(token) as http:
        created = http.post("/v1/jobs", json={"prefix": f"s3://api-in/{key.id}/cat"})
        assert created.status_code == 202, created.text
        record = created.json()
        assert record["prefix"] == f"s3://api-in/{key.id}/cat/" and record["kind"] == "batch"
        done = wait_done(http, record["id"], timeout=120)
        assert done["state"] == "succeeded" and done["counts"]["total"] == 6
        assert [i["input"].rsplit("/", 1)[1] for i in done["items"]] == [
            f"{i}.png" for i in range(6)
        ]
        both = http.post(
            "/v1/jobs", json={"prefix": "s3://api-in/x/", "inputs": ["s3://api-in/a.png"]}
        )
        problem(both, 422, "invalid_request", "/prefix")
    with api_stack.client(narrow_token) as http:  # another key's folder: refused at submit
        problem(http.post("/v1/jobs", json={"prefix": "s3://api-in/"}), 403, "forbidden", "/prefix")
    assert narrow.input_prefixes == [f"s3://api-in/{key.id}/"]


def test_invalid_requests_name_the_field(api_stack):
    key, token = api_stack.key("validator")
    uri = api_stack.put(f"{key.id}/v.png", photo(6))
    with api_stack.client(token) as http:
        cases = [
            ({}, "/input"),
            ({"input": uri, "inputs": [uri]}, "/inputs"),
            ({"input": uri, "format": "gif"}, "/format"),
            ({"input": uri, "refine": "yes"}, "/refine"),
            ({"inputs": [uri, 7]}, "/inputs/1"),
            ({"input": uri, "extra": 1}, "/extra"),
            ({"input": uri, "webhook_url": "ftp://x"}, "/webhook_url"),
            ({"input": "gopher://x/y.png"}, "/input"),
        ]
        for body, pointer in cases:
            answer = problem(http.post("/v1/jobs", json=body), 422, "invalid_request")
            assert pointer in [e["pointer"] for e in answer["errors"]], (body, answer)
        problem(
            http.post("/v1/jobs", content=b"input=x", headers={"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
        )
        answer = problem(
            http.post(
                "/v1/jobs",
                content=b'{"input": "\xff"}',
                headers={"Content-Type": "application/json"},
            ),
            422,
            "invalid_request",
        )
        nested = b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        problem(
            http.post("/v1/jobs", content=nested, headers={"Content-Type": "application/json"}),
            422,
            "invalid_request",
        )
        big = b'{"input": "' + b"a" * (2 * 1024 * 1024) + b'"}'
        problem(
            http.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"}),
            413,
            "payload_too_large",
        )
    assert api_stack.api.alive()


def test_keys_command(api_stack):
    env = {**api_stack.env}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "ben2q.cli", "keys", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    made = run("create", "cli-tenant", "--input-prefix", "s3://api-in/cli/", "--rate", "50")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("b2q_") and "shown only once" in made.stderr
    key_id = token.split("_")[1]
    listing = run("list")
    assert key_id in listing.stdout and token not in listing.stdout
    assert "s3://api-in/cli/" in listing.stdout
    with api_stack.client(token) as http:
        answer = http.get("/v1/jobs")
        assert answer.status_code == 200
        assert answer.headers["ratelimit-policy"] == '"requests";q=50;w=60'
        assert run("revoke", key_id).returncode == 0
        problem(http.get("/v1/jobs"), 401, "unauthorized")
    assert run("revoke", "0000000000000000").returncode == 2
    bad = run("create", "x", "--input-prefix", "ftp://nope/")
    assert bad.returncode == 2 and "input_prefixes[0]" in bad.stderr
