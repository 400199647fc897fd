"""Tests of ben2q.fetch: the address policy, and real fetches from loopback HTTP(S) servers.

No test sends traffic anywhere but 127.0.0.1/127.0.0.2/::1: public addresses appear only as
inputs of the pure ``address_allowed``, and no external name is ever resolved.
"""

from __future__ import annotations

import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ben2q import fetch
from ben2q.config import Settings
from ben2q.errors import FetchError, FetchFailed, ForbiddenURL, ImageTooLarge
from ben2q.fetch import address_allowed, fetch_bytes, resolve_and_check

# --------------------------------------------------------------------------------------
# address_allowed
# --------------------------------------------------------------------------------------

REFUSED = [
    "10.0.0.1",
    "10.255.255.255",
    "172.16.5.4",
    "172.31.255.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "169.254.0.1",
    "127.0.0.1",
    "127.1.2.3",
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "::1",
    "::",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:169.254.169.254",
    "::ffff:10.1.2.3",
    "::127.0.0.1",  # deprecated IPv4-compatible form
    "fe80::1",  # link-local
    "fd00:ec2::254",  # AWS metadata (IPv6)
    "fc00::1",  # unique local
    "fec0::1",  # site-local
    "ff02::1",  # multicast
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::1",  # local-use NAT64
    "2001:db8::1",  # documentation
    "2001::1",  # Teredo
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",  # mapped form of a public address
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize("text", REFUSED)
def test_refused_addresses(text: str) -> None:
    ip = ipaddress.ip_address(text)
    assert address_allowed(ip, allow_private=False) is False
    assert address_allowed(text, allow_private=False) is False  # the str form too
    assert address_allowed(ip, allow_private=True) is True


@pytest.mark.parametrize("text", ALLOWED)
def test_allowed_addresses(text: str) -> None:
    assert address_allowed(ipaddress.ip_address(text), allow_private=False) is True


def test_zone_id_is_ignored() -> None:
    assert address_allowed("fe80::1%eth0", allow_private=False) is False


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 2**32 - 1))
def test_ipv6_embeddings_follow_the_ipv4_verdict(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    verdict = address_allowed(v4, allow_private=False)
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | value)
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)
    nat64 = ipaddress.IPv6Address((0x64FF9B << 96) | value)
    for v6 in (mapped, sixtofour, nat64):
        assert address_allowed(v6, allow_private=False) is verdict, v6


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.sampled_from(
        [
            "10.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "224.0.0.0/4",
        ]
    ),
    st.integers(0, 2**32 - 1),
)
def test_every_address_of_a_refused_range_is_refused(net: str, value: int) -> None:
    network = ipaddress.IPv4Network(net)
    ip = network[value % network.num_addresses]
    assert address_allowed(ip, allow_private=False) is False


# --------------------------------------------------------------------------------------
# resolve_and_check (loopback names and literals only)
# --------------------------------------------------------------------------------------


def test_resolve_refuses_localhost() -> None:
    with pytest.raises(ForbiddenURL) as info:
        resolve_and_check("localhost", 80, allow_private=False)
    assert info.value.code == "forbidden_url"
    assert "disallowed address" in str(info.value)


def test_resolve_allows_localhost_when_private_allowed() -> None:
    addresses = resolve_and_check("localhost", 80, allow_private=True)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


def test_resolve_ip_literal_and_policy() -> None:
    assert resolve_and_check("127.0.0.1", 80, allow_private=True) == ["127.0.0.1"]
    seen: list[str] = []

    def policy(ip: fetch.IPAddress) -> bool:
        seen.append(str(ip))
        return False

    with pytest.raises(ForbiddenURL):
        resolve_and_check("127.0.0.1", 80, allow_private=True, policy=policy)
    assert seen == ["127.0.0.1"]  # the policy replaces allow_private


# --------------------------------------------------------------------------------------
# Loopback HTTP servers
# --------------------------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        route = self.server.routes.get(urlsplit(self.path).path)
        if route is None:
            reply(self, 404, b"not found")
        else:
            route(self)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        self.requests: list[tuple[str, str]] = []
        self.routes: dict[str, Route] = {}
        super().__init__((host, 0), _Handler)


class Server:
    """A threaded HTTP(S) server on a loopback address and a free port."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.httpd = _HTTPServer(host)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.httpd.requests

    def route(self, path: str, handler: Route) -> None:
        self.httpd.routes[path] = handler

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_length: bool = True,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if content_length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: reply(h, status, headers={"Location": location})


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


def _drip(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.end_headers()  # no Content-Length: the body ends when the connection closes
    try:
        for _ in range(50):  # 10 s at most, far beyond every test's time limit
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass  # the client gave up: that is the point


def _stall(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.flush()
    time.sleep(4)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.route("/image.png", lambda h: reply(h, 200, PNG, {"Content-Type": "image/png"}))
    srv.route("/echo-host", lambda h: reply(h, 200, h.headers.get("Host", "").encode()))
    srv.route("/big", lambda h: reply(h, 200, b"\0" * 5000))
    srv.route("/big-no-length", lambda h: reply(h, 200, b"\0" * 5000, content_length=False))
    srv.route("/exact", lambda h: reply(h, 200, b"\1" * 1000, content_length=False))
    srv.route("/slow", _drip)
    srv.route("/stall", _stall)
    srv.route("/error", lambda h: reply(h, 500, b"boom"))
    for n in range(1, 6):
        srv.route(f"/chain/{n}", redirect(f"/chain/{n - 1}"))
    srv.route("/chain/0", redirect(srv.url("/image.png"), status=301))
    srv.route("/relative/a/b", redirect("../../image.png", status=307))
    srv.route("/loop", redirect("/loop"))
    yield srv
    srv.close()


@pytest.fixture
def second_server() -> Iterator[Server]:
    srv = Server()
    srv.route("/image.png", lambda h: reply(h, 200, PNG))
    yield srv
    srv.close()


PRIVATE = Settings(allow_private_urls=True, fetch_timeout=5.0, fetch_connect_timeout=2.0)


# --------------------------------------------------------------------------------------
# Refusals before any request
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_loopback_refused_by_default(server: Server, host: str) -> None:
    with pytest.raises(ForbiddenURL) as info:
        fetch_bytes(server.url("/image.png", host=host), settings=Settings())
    assert info.value.code == "forbidden_url"
    assert server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/image.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
    ],
)
def test_unsupported_schemes_refused(url: str) -> None:
    with pytest.raises(ForbiddenURL) as info:
        fetch_bytes(url, settings=PRIVATE)
    scheme = url.split(":", 1)[0]
    assert repr(scheme) in str(info.value)


def test_credentials_in_url_refused(server: Server) -> None:
    url = f"http://user:secret@127.0.0.1:{server.port}/image.png"
    with pytest.raises(ForbiddenURL, match="credentials"):
        fetch_bytes(url, settings=PRIVATE)
    assert server.requests == []


# --------------------------------------------------------------------------------------
# Fetches with private addresses allowed
# --------------------------------------------------------------------------------------


def test_fetch_image(server: Server) -> None:
    assert fetch_bytes(server.url("/image.png"), settings=PRIVATE) == PNG
    assert server.requests == [("/image.png", f"127.0.0.1:{server.port}")]


def test_fetch_by_name_pins_address_and_keeps_host_header(server: Server) -> None:
    body = fetch_bytes(server.url("/echo-host?x=1", host="localhost"), settings=PRIVATE)
    assert body == f"localhost:{server.port}".encode()
    assert server.requests[0][0] == "/echo-host?x=1"  # path and query kept


def test_redirect_chain_followed(server: Server) -> None:
    # Exactly fetch_max_redirects (5) redirects: /chain/4 .. /chain/0, then /image.png.
    assert fetch_bytes(server.url("/chain/4"), settings=PRIVATE) == PNG
    assert len(server.requests) == 6


def test_relative_redirect(server: Server) -> None:
    assert fetch_bytes(server.url("/relative/a/b"), settings=PRIVATE) == PNG


def test_redirect_to_other_server(server: Server, second_server: Server) -> None:
    server.route("/away", redirect(second_server.url("/image.png")))
    assert fetch_bytes(server.url("/away"), settings=PRIVATE) == PNG
    assert len(second_server.requests) == 1


def test_too_many_redirects(server: Server) -> None:
    limited = PRIVATE.model_copy(update={"fetch_max_redirects": 3})
    with pytest.raises(FetchFailed, match="too many redirects"):
        fetch_bytes(server.url("/chain/5"), settings=limited)
    assert len(server.requests) == 4  # the first request and 3 redirects, no more
    with pytest.raises(FetchFailed, match="too many redirects"):
        fetch_bytes(server.url("/loop"), settings=PRIVATE)


def test_no_redirects_allowed(server: Server) -> None:
    none = PRIVATE.model_copy(update={"fetch_max_redirects": 0})
    assert fetch_bytes(server.url("/image.png"), settings=none) == PNG
    with pytest.raises(FetchFailed, match="too many redirects"):
        fetch_bytes(server.url("/chain/0"), settings=none)


def test_redirect_to_a_forbidden_scheme(server: Server) -> None:
    server.route("/to-file", redirect("file:///etc/passwd"))
    with pytest.raises(ForbiddenURL, match="'file'"):
        fetch_bytes(server.url("/to-file"), settings=PRIVATE)


@pytest.mark.parametrize("path,status", [("/missing", 404), ("/error", 500)])
def test_http_error_status(server: Server, path: str, status: int) -> None:
    with pytest.raises(FetchFailed) as info:
        fetch_bytes(server.url(path), settings=PRIVATE)
    assert info.value.code == "fetch_failed"
    assert str(status) in str(info.value)


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
def test_body_over_byte_limit(server: Server, path: str) -> None:
    small = PRIVATE.model_copy(update={"max_image_bytes": 1000})
    with pytest.raises(ImageTooLarge) as info:
        fetch_bytes(server.url(path), settings=small)
    assert info.value.code == "image_too_large"
    assert "1000" in str(info.value)


def test_declared_length_refused_before_reading(server: Server) -> None:
    """A huge Content-Length is refused at once, without waiting for a body that never comes."""

    def huge_then_stall(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10**12))
        h.end_headers()
        h.wfile.flush()
        time.sleep(3)

    server.route("/huge", huge_then_stall)
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match=str(10**12)):
        fetch_bytes(server.url("/huge"), settings=PRIVATE)
    assert time.monotonic() - start < 1.0


def test_body_at_byte_limit_is_fine(server: Server) -> None:
    small = PRIVATE.model_copy(update={"max_image_bytes": 1000})
    assert fetch_bytes(server.url("/exact"), settings=small) == b"\1" * 1000


def test_slow_drip_hits_the_time_limit(server: Server) -> None:
    quick = PRIVATE.model_copy(update={"fetch_timeout": 1.0})
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="time limit"):
        fetch_bytes(server.url("/slow"), settings=quick)
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 2.5, elapsed


def test_stalled_body_hits_the_time_limit(server: Server) -> None:
    quick = PRIVATE.model_copy(update={"fetch_timeout": 1.0})
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="time limit") as info:
        fetch_bytes(server.url("/stall"), settings=quick)
    assert time.monotonic() - start < 2.5
    assert isinstance(info.value.__cause__, httpx.TimeoutException)


def test_connection_refused_is_fetch_failed() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchFailed) as info:
        fetch_bytes(f"http://127.0.0.1:{port}/", settings=PRIVATE)
    assert isinstance(info.value.__cause__, httpx.HTTPError)


# --------------------------------------------------------------------------------------
# Every redirect hop is re-validated
# --------------------------------------------------------------------------------------


def test_redirect_target_revalidated_other_address(server: Server) -> None:
    """127.0.0.1 is allowed by the policy, the redirect target 127.0.0.2 is not."""
    try:
        target = Server(host="127.0.0.2")
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address on this system")
    try:
        target.route("/image.png", lambda h: reply(h, 200, PNG))
        server.route("/away", redirect(target.url("/image.png")))

        def only_first(ip: fetch.IPAddress) -> bool:
            return str(ip) == "127.0.0.1"

        with pytest.raises(ForbiddenURL, match="127.0.0.2"):
            fetch_bytes(server.url("/away"), settings=PRIVATE, policy=only_first)
        assert [path for path, _ in server.requests] == ["/away"]
        assert target.requests == []
        # The same hop is fine when the policy allows it: the refusal above was the check.
        assert fetch_bytes(server.url("/away"), settings=PRIVATE) == PNG
        assert len(target.requests) == 1
    finally:
        target.close()


def test_redirect_target_revalidated_policy_called_per_hop(
    server: Server, second_server: Server
) -> None:
    """A policy that allows only its first call: the second hop must be checked and refused."""
    server.route("/away", redirect(second_server.url("/image.png", host="localhost")))
    calls: list[str] = []

    def first_call_only(ip: fetch.IPAddress) -> bool:
        calls.append(str(ip))
        return len(calls) == 1

    with pytest.raises(ForbiddenURL):
        fetch_bytes(server.url("/away"), settings=PRIVATE, policy=first_call_only)
    assert len(calls) == 2
    assert len(server.requests) == 1
    assert second_server.requests == []


# --------------------------------------------------------------------------------------
# HTTPS: the pinned connection verifies the certificate against the URL's name
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(
    localhost_cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    cert, key = localhost_cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # trust only the test cert
    monkeypatch.setattr(fetch, "_ssl_context", lambda: client_ctx)
    srv = Server(tls=server_ctx)
    srv.route("/image.png", lambda h: reply(h, 200, PNG))
    yield srv
    srv.close()


def test_https_by_name_verifies_against_the_name(tls_server: Server) -> None:
    assert fetch_bytes(tls_server.url("/image.png", host="localhost"), settings=PRIVATE) == PNG


def test_https_certificate_not_matching_fails(tls_server: Server) -> None:
    # The certificate names "localhost" only: asking for the IP must fail verification,
    # which shows verification is on and uses the URL's host, not the pinned address.
    with pytest.raises(FetchFailed) as info:
        fetch_bytes(tls_server.url("/image.png", host="127.0.0.1"), settings=PRIVATE)
    assert "certificate" in str(info.value).lower() or "ssl" in str(info.value).lower()
    assert tls_server.requests == []


def test_errors_are_fetch_errors(server: Server) -> None:
    for url in ("ftp://x/", server.url("/missing")):
        with pytest.raises(FetchError):
            fetch_bytes(url, settings=PRIVATE)
