"""Outbound target checks: public addresses only, unless a range is opened."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from dembrane.webhooks.delivery.targets import (
    PolicyResolver,
    TargetBlockedError,
    TargetPolicy,
    TargetRefused,
    check_target,
    validate_url_syntax,
)
from dembrane.webhooks.domain.errors import InvalidArgument

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::", "embeds 127.0.0.1"),
    ("fec0::1", "site-local"),
    ("192.0.0.8", "special-purpose"),
    ("192.88.99.1", "special-purpose"),
    ("3fff::1", "documentation"),
    ("5f00::1", "reserved"),
    ("2001:db8::1", "private"),
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_non_public_addresses_are_refused(address: str, kind: str) -> None:
    """Loopback, private, link-local, metadata, CGNAT, multicast and mapped forms are refused."""
    policy = TargetPolicy()
    ip = ipaddress.ip_address(address)
    assert not policy.is_allowed_address(ip)
    reason = policy.refusal_reason(ip)
    assert reason is not None
    assert kind in reason


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    """Globally routable unicast addresses are allowed by default."""
    assert TargetPolicy().is_allowed_address(ipaddress.ip_address(address))


def test_allowed_networks_open_private_ranges() -> None:
    """An allowed CIDR opens exactly its range, IPv4-mapped forms included."""
    policy = TargetPolicy([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fc00::/7")])
    assert policy.is_allowed_address(ipaddress.ip_address("127.0.0.1"))
    assert policy.is_allowed_address(ipaddress.ip_address("127.5.5.5"))
    assert policy.is_allowed_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert policy.is_allowed_address(ipaddress.ip_address("fd00::1"))
    assert not policy.is_allowed_address(ipaddress.ip_address("10.0.0.1"))
    assert not policy.is_allowed_address(ipaddress.ip_address("::1"))


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "empty"),
        ("ftp://example.com/hook", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("https://", "host"),
        ("https://user:pw@example.com/hook", "user name or password"),
        ("https://token@example.com/hook", "user name or password"),
        ("https://example.com/ho ok", "spaces"),
        ("https://example.com/\nhook", "line breaks"),
        ("https://example.com:99999/hook", "port"),
        ("https://example.com/" + "a" * 2048, "2048"),
        ("http://16843009/", "usual form"),
        ("http://2130706433:8080/", "usual form"),
        ("http://127.1:8080/", "usual form"),
        ("http://01.1.1.1/", "usual form"),
        ("http://0x7f.1/", "usual form"),
        ("http://1.1.1.1./", "usual form"),
        ("http://1.1.1.1:+80/", "port"),
        ("https://[2606:4700:4700::1111%25eth0]/", "IPv6 zone"),
        ("http://[fe80::1%eth0]:8080/", "IPv6 zone"),
        ("http://example.com:%38%30/", "port"),
    ],
)
def test_url_syntax_errors_are_sentences(url: str, fragment: str) -> None:
    """Each kind of malformed URL is named in one sentence."""
    problem = validate_url_syntax(url)
    assert problem is not None
    assert fragment in problem
    assert problem.endswith(".")


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "http://93.184.215.14:8080/x?y=1",
        "https://[2606:4700::1]/",
        "https://[2606:4700::1]:8443/",
        "https://example.com.:443/",
        "https://1password.com/",
        "https://365.example/",
        "https://example.com/a:b@c",
    ],
)
def test_good_urls_pass_the_syntax_check(url: str) -> None:
    """Ordinary http and https URLs have no syntax problem."""
    assert validate_url_syntax(url) is None


async def test_check_target_refuses_a_literal_private_ip() -> None:
    """A URL naming a private IP is refused on the url field with a clear sentence."""
    with pytest.raises(TargetRefused) as caught:
        await check_target("http://10.0.0.1/hook", TargetPolicy())
    error = caught.value
    assert isinstance(error, InvalidArgument)
    assert error.violations[0].field == "url"
    assert error.message == (
        "The URL points to 10.0.0.1, a private address; webhooks must target public addresses."
    )


async def test_check_target_refuses_a_literal_ipv6_loopback() -> None:
    """A bracketed IPv6 loopback literal is refused."""
    with pytest.raises(TargetRefused, match="loopback"):
        await check_target("http://[::1]:8080/hook", TargetPolicy())


@pytest.mark.parametrize("host", ["localhost", "no-such-host.invalid"])
async def test_check_target_refuses_names_alike_whether_private_or_unknown(host: str) -> None:
    """A name that resolves to loopback and one that does not resolve get the same sentence,
    which names no address: saving webhooks must not map the service's internal names."""
    with pytest.raises(TargetRefused) as caught:
        await check_target(f"http://{host}:8080/hook", TargetPolicy())
    assert caught.value.message == (
        f"The URL's host {host} does not resolve to a public address; "
        "webhooks must target public addresses."
    )


async def test_check_target_refuses_bad_syntax_as_invalid_argument() -> None:
    """A syntax problem is reported through the same error on the url field."""
    with pytest.raises(TargetRefused) as caught:
        await check_target("ftp://example.com/", TargetPolicy())
    assert caught.value.violations[0].field == "url"


async def test_check_target_accepts_allowed_ranges() -> None:
    """An allowed range lets a loopback URL through, by literal and by name."""
    policy = TargetPolicy([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")])
    await check_target("http://127.0.0.1:9/hook", policy)
    await check_target("http://localhost:9/hook", policy)


async def test_policy_resolver_drops_refused_addresses() -> None:
    """At connect time the resolver refuses a host whose every address is refused."""
    resolver = PolicyResolver(TargetPolicy())
    try:
        with pytest.raises(TargetBlockedError, match="does not resolve to a public address"):
            await resolver.resolve("localhost", 80, socket.AF_INET)
    finally:
        await resolver.close()


async def test_policy_resolver_keeps_allowed_addresses() -> None:
    """Addresses inside an allowed range pass the resolver."""
    resolver = PolicyResolver(TargetPolicy([ipaddress.ip_network("127.0.0.0/8")]))
    try:
        results = await resolver.resolve("localhost", 80, socket.AF_INET)
    finally:
        await resolver.close()
    assert results
    assert all(result["host"].startswith("127.") for result in results)
