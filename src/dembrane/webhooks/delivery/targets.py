"""Which URLs a webhook may point at: public addresses only (protection against SSRF).

A URL is checked when the webhook is saved (``check_target``) and again at every connect
(``PolicyResolver`` filters what DNS returns), so a host that resolves to a public address
when saved and to ``10.0.0.1`` later (DNS rebinding) is still refused. Literal-IP URLs never
reach a resolver, so the sender checks them itself with ``literal_refusal``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from dembrane.webhooks.config import IPNetwork
from dembrane.webhooks.domain.errors import FieldViolation, InvalidArgument
from dembrane.webhooks.domain.text import has_control_characters

__all__ = [
    "MAX_URL_LENGTH",
    "IPAddress",
    "IPNetwork",
    "PolicyResolver",
    "TargetBlockedError",
    "TargetPolicy",
    "TargetRefused",
    "check_target",
    "literal_refusal",
    "request_url",
    "validate_url_syntax",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048

_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: Ranges the IANA special-purpose registries mark not globally reachable (or deprecated)
#: that this Python's ``ipaddress`` still calls global.
_NOT_GLOBAL: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.IPv4Network("192.0.0.0/24"), "a special-purpose address"),
    (ipaddress.IPv4Network("192.88.99.0/24"), "a special-purpose address"),
    (ipaddress.IPv6Network("fec0::/10"), "a site-local address"),
    (ipaddress.IPv6Network("3fff::/20"), "a documentation address"),
    (ipaddress.IPv6Network("5f00::/16"), "a special-purpose address"),
)
_BAD_PORT = "The URL's port must be a number from 1 to 65535."
#: A host whose last label is a number is an IPv4 address to URL parsers, in whatever form.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+", re.IGNORECASE)
#: What the connector refuses on sight, so such URLs would only ever fail.
_ODD_IPV4 = (
    "The URL's host must be a name or an IPv4 address in its usual form (four numbers from "
    "0 to 255 with dots, such as 93.184.215.14)."
)


class TargetRefused(InvalidArgument):
    """A webhook URL points at an address webhooks may not reach, or at nothing at all."""

    @classmethod
    def because(cls, description: str) -> TargetRefused:
        """The refusal of the ``url`` field, for the reason ``description`` gives."""
        return cls(description, violations=[FieldViolation("url", description)])


class TargetBlockedError(OSError):
    """Raised at connect time when every address of the host is refused by the policy."""


class TargetPolicy:
    """Decides which IP addresses outbound requests may reach.

    Public (globally routable, unicast) addresses are allowed; every other kind is refused
    unless it lies inside one of the ``allowed`` networks, which open private ranges for
    development and tests.
    """

    __slots__ = ("_allowed",)

    def __init__(self, allowed: Sequence[IPNetwork] = ()) -> None:
        self._allowed: tuple[IPNetwork, ...] = tuple(allowed)

    @property
    def allowed(self) -> tuple[IPNetwork, ...]:
        """The networks opened on top of the public internet."""
        return self._allowed

    def is_allowed_address(self, ip: IPAddress) -> bool:
        """Whether a request may be sent to ``ip``."""
        return self.refusal_reason(ip) is None

    def refusal_reason(self, ip: IPAddress) -> str | None:
        """What kind of address a refused ``ip`` is (``"a private address"``), else None."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # ::ffff:10.0.0.1 reaches 10.0.0.1; judge it as the address it really is.
            ip = ip.ipv4_mapped
        if self._opened(ip):
            return None
        kind = _non_public_kind(ip)
        if kind is not None:
            return kind
        # Public IPv6 forms that carry an IPv4 address reach that address through a relay.
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not self._opened(embedded):
            inner = _non_public_kind(embedded)
            if inner is not None:
                return f"an address that embeds {embedded}, {inner}"
        return None

    def _opened(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._allowed)


def _non_public_kind(ip: IPAddress) -> str | None:
    # The order matters: 127.0.0.1 is also "private" to ipaddress, but "loopback" says more.
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    for network, kind in _NOT_GLOBAL:
        if ip.version == network.version and ip in network:
            return kind
    if not ip.is_global:
        return "a non-public address"
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IP address rather than a name to resolve."""
    return _parse_ip(host) is not None


def _refusal_sentence(subject: str, ip: IPAddress | str, kind: str) -> str:
    return f"{subject} {ip}, {kind}; webhooks must target public addresses."


# What may stand in a URL's path and query as written: RFC 3986's unreserved and reserved
# characters, and percent-escapes. Anything else (non-ASCII, a lone ``%``) is escaped.
_NOT_IN_URI = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]|%(?![0-9A-Fa-f]{2})")


def _escape_stray(part: str) -> str:
    return _NOT_IN_URI.sub(lambda m: urllib.parse.quote(m.group(), safe=""), part)


def request_url(url: str) -> URL:
    """The URL a request to the webhook ``url`` goes to, its path and query as their owner
    wrote them.

    yarl decodes every escape and encodes again, so ``%3B`` would go out as ``;`` and
    ``a%2Fb`` in a query as ``a/b``: a different URL to a receiver that routes on it or
    checks it. Only characters a URL cannot carry are escaped here; the fragment is not
    sent. Raises ``ValueError`` for a URL yarl cannot read.
    """
    parsed = URL(url)
    parts = urllib.parse.urlsplit(url)
    return URL.build(
        scheme=parsed.scheme,
        authority=parsed.raw_authority,
        path=_escape_stray(parts.path) or "/",
        query_string=_escape_stray(parts.query),
        encoded=True,
    )


def validate_url_syntax(url: str) -> str | None:
    """What is wrong with the form of ``url`` as a webhook target, in one sentence, or None."""
    if not url:
        return "The URL is empty."
    if len(url) > MAX_URL_LENGTH:
        return f"The URL is longer than {MAX_URL_LENGTH} characters."
    if " " in url or has_control_characters(url):
        return "The URL must not contain spaces, line breaks or control characters."
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        # yarl names the fault (a port out of range, a broken IPv6 literal, ...).
        reason = str(exc).removeprefix("Invalid URL: ").rstrip(".")
        if "port" in reason.lower():
            return _BAD_PORT
        return f"The URL is not a valid URL: {reason}." if reason else "The URL is not valid."
    if parsed.scheme not in ("http", "https"):
        return "The URL must start with http:// or https://."
    host = parsed.raw_host
    if not host:
        return "The URL must name a host."
    if "%" in host:
        # A zone names one of this machine's interfaces; no receiver is reached through one.
        return "The URL's host must not carry an IPv6 zone (the part after %)."
    if _parse_ip(host) is None and _NUMERIC_LABEL.fullmatch(host.rstrip(".").rpartition(".")[2]):
        return _ODD_IPV4
    if parsed.explicit_port == 0 or not _port_written_plainly(url):
        return _BAD_PORT
    if parsed.raw_user is not None or parsed.raw_password is not None:
        # Credentials in the URL would show up in logs and in every copy of the webhook.
        return (
            "The URL must not contain a user name or password; "
            "the signing secret authenticates the requests."
        )
    return None


def _port_written_plainly(url: str) -> bool:
    """Whether the URL's port, if any, is written as digits only (yarl also reads ``:+80``)."""
    authority = url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host_and_port = authority.rpartition("@")[2]
    if host_and_port.endswith("]") or ":" not in host_and_port:
        return True
    port = host_and_port.rpartition(":")[2]
    return port == "" or (port.isascii() and port.isdigit())


def literal_refusal(host: str, policy: TargetPolicy) -> str | None:
    """Why a URL whose host is the IP literal ``host`` is refused, or None.

    Returns None for a host name as well: names are checked where they are resolved.
    """
    ip = _parse_ip(host)
    if ip is None:
        return None
    kind = policy.refusal_reason(ip)
    if kind is None:
        return None
    return _refusal_sentence("The URL points to", ip, kind)


async def check_target(url: str, policy: TargetPolicy) -> None:
    """Refuse ``url`` unless its syntax is right and every address of its host is allowed.

    Raises ``TargetRefused`` (an ``InvalidArgument`` on the ``url`` field) otherwise.
    """
    problem = validate_url_syntax(url)
    if problem is not None:
        raise TargetRefused.because(problem)
    host = URL(url).raw_host
    assert host is not None  # validate_url_syntax made sure there is one
    refusal = literal_refusal(host, policy)
    if refusal is not None:
        raise TargetRefused.because(refusal)
    if _parse_ip(host) is not None:
        return
    # One sentence whether the name is unknown or resolves to a private address: naming the
    # address would let anyone who may save a webhook map the service's internal names.
    refused = TargetRefused.because(
        f"The URL's host {host} does not resolve to a public address; "
        "webhooks must target public addresses."
    )
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise refused from None
    addresses = [ip for info in infos if (ip := _parse_ip(str(info[4][0]))) is not None]
    # Every address must pass: a connection may go to any of them.
    if not addresses or any(policy.refusal_reason(ip) is not None for ip in addresses):
        raise refused


class PolicyResolver(AbstractResolver):
    """A resolver (aiohttp's interface, over its default resolver) that drops the addresses
    the policy refuses.

    Used by the sender's HTTP client, it judges the very addresses the socket will connect
    to, so a host cannot pass the check when saved and point elsewhere when used.
    """

    def __init__(self, policy: TargetPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner: AbstractResolver = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The addresses of ``host`` the policy allows; ``TargetBlockedError`` if none."""
        results = await self._inner.resolve(host, port, family)
        allowed = [
            result
            for result in results
            if (ip := _parse_ip(result["host"])) is not None and self._policy.is_allowed_address(ip)
        ]
        if not allowed:
            # As on save, the private address a name has is not told (see check_target).
            raise TargetBlockedError(
                f"The target host {host} does not resolve to a public address; "
                "webhooks must target public addresses."
            )
        return allowed

    async def close(self) -> None:
        """Release the wrapped resolver."""
        await self._inner.close()
