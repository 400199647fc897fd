"""Guarded HTTP(S) fetching of input images (SSRF-safe).

Why this design: a URL given by a user is fetched by *our* process, from inside our network,
so a careless fetch lets anyone read internal services or the cloud metadata endpoint
(169.254.169.254). Checking the *name* proves nothing (any name can resolve to 127.0.0.1),
and checking the resolved address but then letting the HTTP client resolve the name again
leaves a DNS-rebinding window: a hostile DNS server answers the check with a public address
and the connection with a private one. So every hop of a fetch:

1. validates the URL: http or https only, no ``user:password@``;
2. resolves the host once with ``getaddrinfo`` and refuses it if ANY address is disallowed;
3. connects to the checked IP literal itself -- the address is *pinned* -- sending the
   original name in the ``Host`` header and, for https, as the TLS SNI name
   (httpx's ``sni_hostname`` extension), so virtual hosting works and the certificate is
   still verified against the real name, never against the IP;
4. never lets the client follow redirects: each ``Location`` is resolved against the current
   URL and goes through steps 1-3 again as a new hop.

Proxies and ``.netrc`` from the environment are ignored (``trust_env=False``): a proxy would
resolve the name again on its side. Each hop gets a fresh client, so a pooled TLS connection
verified for one name is never reused for another name that resolves to the same address.

Limits (from :class:`~ben2q.config.Settings`): one wall-clock deadline for all hops and the
whole body (``fetch_timeout``), checked between hops and after every received chunk, so a
slow-drip server fails too; ``fetch_connect_timeout`` per connection attempt; at most
``fetch_max_redirects`` redirects; at most ``max_image_bytes`` of body, checked against
``Content-Length`` up front and counted while streaming. A read that stalls completely is
bounded by the read timeout, which is the time left when its hop started.
"""

from __future__ import annotations

import concurrent.futures
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ben2q.config import Settings, get_settings
from ben2q.errors import FetchFailed, ForbiddenURL, ImageTooLarge

__all__ = [
    "IPAddress",
    "AddressPolicy",
    "address_allowed",
    "resolve_and_check",
    "fetch_bytes",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
"""Decides whether one resolved address may be connected to (True) or not."""

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "ben2q-fetch"

# Explicit lists rather than only ``ipaddress``'s is_private/is_global: their exact
# coverage changed across Python releases, and a security boundary must not move with them.
_BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network", includes the unspecified 0.0.0.0
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT (shared address space)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, includes the metadata address 169.254.169.254
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes the broadcast 255.255.255.255
    )
)
_BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible form
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, includes Teredo 2001::/32
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local, includes the AWS metadata address fd00:ec2::254
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, still routable inside sites)
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def address_allowed(ip: IPAddress | str, *, allow_private: bool) -> bool:
    """Whether a fetch may connect to ``ip``: only globally routable unicast addresses.

    Refused: loopback, private, CGNAT, link-local (and the metadata addresses), unique-local,
    site-local, unspecified, multicast, reserved and documentation ranges, and IPv6 forms
    that embed a refused IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16``,
    NAT64 ``64:ff9b::/96``), since the network may route those to the embedded address.
    ``allow_private=True`` allows every address (tests, trusted networks).
    """
    if allow_private:
        return True
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    return not _blocked(ip)


def _blocked(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv4Address):
        if any(ip in net for net in _BLOCKED_V4):
            return True
        return not ip.is_global
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return _blocked(embedded)
    if any(ip in net for net in _BLOCKED_V6):
        return True
    return ip.is_multicast or ip.is_reserved or not ip.is_global


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def resolve_and_check(
    host: str,
    port: int,
    *,
    allow_private: bool,
    policy: AddressPolicy | None = None,
    timeout: float | None = None,
) -> list[str]:
    """Resolve ``host`` once and return its addresses, refusing if ANY is disallowed.

    Refusing on any (not only the first) address matters because a client may try the
    others. ``policy`` replaces :func:`address_allowed` (for embedders with their own rules,
    and for tests); ``timeout`` bounds the resolution, which ``getaddrinfo`` itself cannot.
    Raises :class:`ForbiddenURL` for a disallowed address, :class:`FetchFailed` if the name
    does not resolve in time.
    """
    check = policy or functools.partial(address_allowed, allow_private=allow_private)
    infos = _getaddrinfo(host, port, timeout)
    addresses: list[str] = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id ("fe80::1%eth0")
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise FetchFailed(f"host {host!r} resolves to no address")
    for text in addresses:
        if not check(ipaddress.ip_address(text)):
            raise ForbiddenURL(f"host {host!r} resolves to a disallowed address {text}")
    return addresses


def _getaddrinfo(host: str, port: int, timeout: float | None) -> list[tuple]:
    def resolve() -> list[tuple]:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)

    try:
        if timeout is None:
            return resolve()
        # getaddrinfo has no timeout of its own: run it aside and stop waiting at the deadline
        # (the thread ends on its own when the system resolver gives up).
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ben2q-resolve")
        try:
            return pool.submit(resolve).result(timeout=max(timeout, 0.0))
        finally:
            pool.shutdown(wait=False)
    except concurrent.futures.TimeoutError as exc:
        raise FetchFailed(f"resolving host {host!r} exceeded the time limit") from exc
    except (OSError, UnicodeError) as exc:
        raise FetchFailed(f"cannot resolve host {host!r}: {exc}") from exc


@dataclass(frozen=True)
class _Target:
    """One validated hop: where to connect and what name to present."""

    url: httpx.URL
    scheme: str
    host: str  # ASCII (IDNA) form, no brackets
    port: int
    host_header: str
    path: str  # path and query, percent-encoded

    def pinned_url(self, ip: str) -> str:
        literal = f"[{ip}]" if ":" in ip else ip
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


def _parse_url(url: str | httpx.URL) -> httpx.URL:
    try:
        return url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ForbiddenURL(f"malformed URL: {exc}") from exc


def _validate(url: httpx.URL) -> _Target:
    scheme = url.scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise ForbiddenURL(f"URL scheme {scheme!r} is not allowed (only http and https)")
    if url.userinfo:
        raise ForbiddenURL("URLs with credentials (user:password@) are not allowed")
    host = url.raw_host.decode("ascii")
    if not host:
        raise ForbiddenURL("URL has no host")
    default_port = _DEFAULT_PORTS[scheme]
    port = default_port if url.port is None else url.port
    if not 0 < port < 65536:  # the OS would truncate it: :110385 would reach port 44849
        raise ForbiddenURL(f"URL port {port} is out of range")
    host_literal = f"[{host}]" if ":" in host else host
    host_header = host_literal if port == default_port else f"{host_literal}:{port}"
    return _Target(url, scheme, host, port, host_header, url.raw_path.decode("ascii"))


def _remaining(deadline: float, limit: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchFailed(f"fetch exceeded the time limit of {limit:g} s")
    return left


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying context for all fetches (loading the CA bundle is slow; it is shared
    read-only, which ``ssl`` allows)."""
    return httpx.create_ssl_context()


def fetch_bytes(
    url: str,
    *,
    settings: Settings | None = None,
    policy: AddressPolicy | None = None,
) -> bytes:
    """GET ``url`` with the SSRF guard and the limits of ``settings``; return the body.

    ``policy`` replaces the address check (default: :func:`address_allowed` with
    ``settings.allow_private_urls``); it is applied on every hop.

    Raises :class:`ForbiddenURL` (scheme, credentials, disallowed address on any hop),
    :class:`ImageTooLarge` (body over ``max_image_bytes``) and :class:`FetchFailed`
    (network error, non-2xx status, too many redirects, time limit).
    """
    settings = settings or get_settings()
    limit = settings.fetch_timeout
    deadline = time.monotonic() + limit
    current = _parse_url(url)
    try:
        for _hop in range(settings.fetch_max_redirects + 1):
            target = _validate(current)
            addresses = resolve_and_check(
                target.host,
                target.port,
                allow_private=settings.allow_private_urls,
                policy=policy,
                timeout=_remaining(deadline, limit),
            )
            result = _fetch_hop(target, addresses, settings, deadline)
            if isinstance(result, bytes):
                return result
            current = _parse_url(current.join(result))
    except httpx.TimeoutException as exc:
        raise FetchFailed(f"fetch of {current} exceeded the time limit ({exc})") from exc
    except httpx.HTTPError as exc:
        raise FetchFailed(f"fetch of {current} failed: {exc}", transient=True) from exc
    except httpx.InvalidURL as exc:
        raise ForbiddenURL(f"malformed URL: {exc}") from exc
    raise FetchFailed(f"too many redirects (more than {settings.fetch_max_redirects})")


_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _fetch_hop(
    target: _Target, addresses: list[str], settings: Settings, deadline: float
) -> bytes | str:
    """One request on the pinned addresses, tried in order while connecting fails.

    Returns the body, or the ``Location`` of a redirect.
    """
    for index, ip in enumerate(addresses):
        try:
            return _fetch_pinned(target, ip, settings, deadline)
        except httpx.ConnectError:
            if index == len(addresses) - 1:
                raise
    raise AssertionError("unreachable: resolve_and_check returns at least one address")


def _fetch_pinned(target: _Target, ip: str, settings: Settings, deadline: float) -> bytes | str:
    left = _remaining(deadline, settings.fetch_timeout)
    timeout = httpx.Timeout(
        connect=min(settings.fetch_connect_timeout, left), read=left, write=left, pool=left
    )
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    headers = {"Host": target.host_header, "Accept-Encoding": "identity", "User-Agent": _USER_AGENT}
    with httpx.Client(
        verify=_ssl_context(), trust_env=False, follow_redirects=False, timeout=timeout
    ) as client:
        request = client.build_request(
            "GET", target.pinned_url(ip), headers=headers, extensions=extensions
        )
        response = client.send(request, stream=True)
        try:
            status = response.status_code
            if status in _REDIRECT_STATUSES and "location" in response.headers:
                return response.headers["location"]
            if not 200 <= status < 300:
                raise FetchFailed(
                    f"HTTP {status} from {target.url}", transient=status in _TRANSIENT_STATUSES
                )
            return _read_body(response, settings, deadline)
        finally:
            response.close()


def _read_body(response: httpx.Response, settings: Settings, deadline: float) -> bytes:
    max_bytes = settings.max_image_bytes
    declared = response.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(
            f"the URL's body is {int(declared)} bytes, over the limit of {max_bytes} bytes"
        )
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLarge(f"the URL's body is over the limit of {max_bytes} bytes")
        _remaining(deadline, settings.fetch_timeout)
        chunks.append(chunk)
    return b"".join(chunks)
