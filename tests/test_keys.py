"""API keys: scope logic (I/O-free, with hypothesis where the input space is wide) and the
key store and rate limiter on a real redis-server."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

import pytest
import redis.asyncio as aredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ben2q.errors import InvalidRequest
from ben2q.keys import (
    WINDOW,
    ApiKey,
    AsyncKeyStore,
    KeyStore,
    RateLimit,
    ScopeError,
    check_input,
    parse_token,
    resolve_output,
    token_hash,
    under_prefix,
)

DB = 8  # the session server is shared: this module keeps to its own database

REFUSED = (ScopeError, InvalidRequest)


def key(**options) -> ApiKey:
    options.setdefault("input_prefixes", ["s3://in/tenant-a/", "file:///srv/root/in/"])
    return ApiKey(id="0123456789abcdef", name="t", hash="x", created_at=0.0, **options)


# --- input scopes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "s3://in/tenant-a/x.png",
        "s3://in/tenant-a/deep/er/x.png",
        "file:///srv/root/in/a.png",
        "https://cdn.example/a.png?size=2",
    ],
)
def test_inputs_in_scope(uri):
    assert check_input(key(), uri, "input") == uri


@pytest.mark.parametrize(
    "uri",
    [
        "s3://in/tenant-b/x.png",  # another prefix
        "s3://in/tenant-ab/x.png",  # a longer name is not under the prefix
        "s3://other/tenant-a/x.png",  # another bucket
        "s3://in/tenant-a/../tenant-b/x.png",
        "s3://in/tenant-a/%2e%2e/tenant-b/x.png",
        "s3://in/tenant-a/..%2ftenant-b/x.png",
        "s3://in/tenant-a%2F..%2Ftenant-b/x.png",
        "s3://in/tenant-a\\..\\tenant-b/x.png",
        "s3://in/tenant-a//x.png",
        "s3://in/tenant-a/./x.png",
        "s3://in/tenant-%61/x.png",  # storage reads keys literally: 'tenant-%61' is not 'a'
        "s3://in/tenant-a/x.png?/../../tenant-b/y",  # storage would read the '?' part too
        "s3://in/tenant-a/x#/../../tenant-b/y",
        "s3://other@in/tenant-a/x.png",  # storage's bucket would be 'other@in'
        "s3://in:443/tenant-a/x.png",
        "file:///etc/passwd",
        "file:///srv/root/in/../secret.png",
        "file:///srv/root/in/%2e%2e/secret.png",
        "file:///srv/root/in%2f..%2fsecret.png",
        "file://evil/srv/root/in/a.png",
        "file:///srv/root/in/a.png?x",
        "http://cdn.example/a.png",  # plain http is not a public URL input
        "https://cdn.example/a/../b.png",
        "https://cdn.example/%2e%2e/b.png",
        "https://cdn.example:99999/a.png",  # a bad port is refused, not a crash
        "http://[::1/a.png",
        "ftp://x/y.png",
        "",
    ],
)
def test_inputs_out_of_scope(uri):
    with pytest.raises(REFUSED) as info:
        check_input(key(), uri, "inputs[2]")
    assert getattr(info.value, "field", "inputs[2]") == "inputs[2]"


def test_urls_only_when_allowed_and_file_only_by_prefix():
    closed = key(allow_urls=False, input_prefixes=["https://cdn.example/pub/"])
    assert check_input(closed, "https://cdn.example/pub/a.png", "input")
    for uri in ("https://cdn.example/priv/a.png", "https://other.example/pub/a.png"):
        with pytest.raises(ScopeError):
            check_input(closed, uri, "input")
    with pytest.raises(ScopeError):
        check_input(key(input_prefixes=[]), "file:///srv/root/in/a.png", "input")


SEGMENT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SEGMENT, min_size=1, max_size=6), st.sampled_from(["s3", "file", "https"]))
def test_no_accepted_input_escapes_its_prefix(segments, scheme):
    """Whatever the path, an accepted URI's decoded path (as storage and servers read it)
    starts with the prefix's path."""
    prefixes = {
        "s3": "s3://in/tenant-a/",
        "file": "file:///srv/root/in/",
        "https": "https://cdn.example/pub/",
    }
    prefix = prefixes[scheme]
    uri = prefix + "/".join(segments)
    k = key(input_prefixes=[prefix], allow_urls=False)
    try:
        check_input(k, uri, "input")
    except REFUSED:
        return
    import posixpath
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    path = parts.path if scheme == "s3" else unquote(parts.path)
    base = urlsplit(prefix).path
    assert parts.netloc == urlsplit(prefix).netloc
    assert posixpath.normpath(path).startswith(base.rstrip("/"))
    assert path.startswith(base)
    if scheme == "s3":  # storage: everything after the bucket, literally
        assert uri.split("://", 1)[1].partition("/")[2].startswith(base.lstrip("/"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_under_prefix_never_crashes(text):
    for uri in (text, "s3://in/" + text, "https://" + text, "file:///" + text):
        try:
            under_prefix(uri, "s3://in/tenant-a/", "input")
        except REFUSED:
            pass


# --- outputs --------------------------------------------------------------------------


def test_output_defaults_and_sub_paths():
    k = key()
    assert resolve_output(k, None, "s3://out/") == "s3://out/0123456789abcdef/"
    assert resolve_output(k, "", "s3://out") == "s3://out/0123456789abcdef/"
    assert resolve_output(k, "run/2026", "s3://out/") == "s3://out/0123456789abcdef/run/2026/"
    assert (
        resolve_output(k, "s3://out/0123456789abcdef/x", "s3://out/")
        == "s3://out/0123456789abcdef/x/"
    )
    own = key(output_prefix="s3://mine/p")
    assert resolve_output(own, "q", None) == "s3://mine/p/q/"
    with pytest.raises(InvalidRequest):
        resolve_output(key(), None, None)


@pytest.mark.parametrize(
    "output",
    [
        "..",
        "../fedcba9876543210",
        "run/../../x",
        "run%2f..%2fx",
        "run\\..\\x",
        "a b",
        "s3://out/fedcba9876543210/",
        "s3://other/0123456789abcdef/",
        "s3://out/0123456789abcdef/../x/",
        "s3://out/0123456789abcdef/%2e%2e/x/",
        "s3://out/0123456789abcdef/x?y/",
        "file:///etc/",
        "file:///srv/root/out/0123456789abcdef/",
        "https://out/0123456789abcdef/",
        "x" * 2000,
    ],
)
def test_outputs_out_of_scope(output):
    with pytest.raises(REFUSED):
        resolve_output(key(), output, "s3://out/")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_resolved_outputs_stay_under_the_prefix(output):
    try:
        where = resolve_output(key(), output, "s3://out/")
    except REFUSED:
        return
    assert where.startswith("s3://out/0123456789abcdef/") and where.endswith("/")
    rest = where.removeprefix("s3://out/0123456789abcdef/")
    assert ".." not in rest.split("/") and "\\" not in rest and "?" not in rest
    assert quote(rest, safe="/=+@") == rest or "%" not in rest


# --- tokens ---------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_parse_token_only_well_formed(text):
    key_id = parse_token(text)
    if key_id is not None:
        assert text == f"b2q_{key_id}_{text.split('_', 2)[2]}" and len(text) == 4 + 16 + 1 + 43
    token_hash(text)  # any text hashes (non-ASCII included) without raising


# --- the store and the limiter on redis-server ----------------------------------------


def test_store_create_authenticate_revoke(url):
    store = KeyStore(url)
    try:
        made, token = store.create("acme", input_prefixes=["s3://in/acme"], rate_requests=5)
        assert made.input_prefixes == ["s3://in/acme/"] and token.startswith("b2q_")
        assert [k.id for k in store.list()] == [made.id]
        with pytest.raises(InvalidRequest):
            store.create("bad", input_prefixes=["ftp://x/"])
        with pytest.raises(InvalidRequest):
            store.create("bad", output_prefix="https://x/")

        async def check() -> None:
            client = aredis.Redis.from_url(url)
            keys = AsyncKeyStore(client)
            try:
                assert (await keys.authenticate(token)).id == made.id
                wrong = token[:-1] + ("B" if token[-1] == "A" else "A")
                assert await keys.authenticate(wrong) is None
                assert await keys.authenticate("b2q_" + "0" * 16 + "_" + "a" * 43) is None
                assert await keys.authenticate("garbage") is None
                store.revoke(made.id)
                assert await keys.authenticate(token) is None  # at once: nothing cached
            finally:
                await client.aclose()

        asyncio.run(check())
        assert store.get(made.id).revoked_at is not None
        assert store.revoke("f" * 16) is None
    finally:
        store.close()


def test_rate_limit_windows_are_atomic_and_all_or_nothing(url):
    async def check() -> None:
        client = aredis.Redis.from_url(url)
        keys = AsyncKeyStore(client)
        try:
            limit = RateLimit("requests", 10)
            start = (time.time() // WINDOW) * WINDOW + 1  # early in a window
            decisions = await asyncio.gather(
                *(keys.take("k1", limit, now=start) for _ in range(25))
            )
            assert sum(d.allowed for d in decisions) == 10
            assert min(d.remaining for d in decisions) == 0
            assert all(0 < d.reset <= WINDOW for d in decisions)
            # a cost that does not fit takes nothing
            images = RateLimit("images", 3)
            big = await keys.take("k1", images, 4, now=start)
            assert not big.allowed and big.remaining == 3
            assert (await keys.take("k1", images, 3, now=start)).allowed
            # the next window starts afresh; other keys never share a counter
            assert (await keys.take("k1", limit, now=start + WINDOW)).allowed
            assert (await keys.take("k2", limit, now=start)).remaining == 9
            ttl = await client.ttl(keys.names.rate("k1", "requests", int(start // WINDOW)))
            assert 0 < ttl <= WINDOW + 1
            decision = await keys.take("k3", RateLimit("requests", 5), now=start - 1 + 30.5)
            assert decision.reset == 30
            assert decision.item() == '"requests";r=4;t=30'
            assert decision.policy_item() == '"requests";q=5;w=60'
        finally:
            await client.aclose()

    asyncio.run(check())
