"""Settings, read once from the environment into one frozen dataclass.

Every name here is a ``WEBHOOKS_*`` variable of the contract; a bad value stops the
service at start-up with a message that names the variable, never later.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
DEFAULT_DATABASE_URL = "sqlite:///var/webhooks.db"
#: The largest event body by default: gRPC's customary message limit, far above a transcript
#: of a day of talk, and small enough that no receiver's body limit is a surprise.
DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024
MIN_EVENT_BYTES = 4096
#: Half the gRPC server's message limit, so a publish call can always carry one such event.
MAX_EVENT_BYTES_LIMIT = 32 * 1024 * 1024
#: A delivery is started only while its lease still covers a whole request and this margin
#: (recording the outcome, clock drift between replicas); a lease must last a request and
#: twice the margin, so a row can always wait at least one margin in its lane.
LEASE_MARGIN_SECONDS = 2.0
MIN_LEASE_OVER_REQUEST = 2 * LEASE_MARGIN_SECONDS
#: An HS256 key shorter than this can be found from any one token by guessing offline.
MIN_JWT_SECRET_BYTES = 32
#: The HS256 secret the README's examples use, so anyone can mint tokens for it.
DOCUMENTED_JWT_SECRET = "dev-only-secret-never-use-in-production"  # noqa: S105 - to warn of
#: Addresses whose opening would let webhooks read cloud instance metadata (credentials).
_METADATA_ADDRESSES = (
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
)
MAX_RETRY_DELAY_SECONDS = 30 * 86400
MAX_RETRY_SLOTS = 50
#: Bounds that no sane value passes, so absurd ones fail at start rather than in use.
MAX_TIMEOUT_SECONDS = 3600
MAX_DAYS = 36500
#: The longest ``WEBHOOKS_SHUTDOWN_DELAY``: orchestrators give a stopping process
#: 30 seconds by default before they kill it, and a few minutes is already generous.
MAX_SHUTDOWN_DELAY_SECONDS = 300.0
#: Webhooks one project may have (archived ones aside) unless WEBHOOKS_MAX_WEBHOOKS_PER_PROJECT
#: says otherwise: each is a copy of every event, so the bound keeps one event from turning
#: into thousands of requests.
DEFAULT_MAX_WEBHOOKS_PER_PROJECT = 100
# scheme://host[:port]; the host a name, an IPv4 address or a bracketed IPv6 address.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting in the environment has a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the service. Defaults are those of the contract."""

    grpc_port: int = 50051
    http_port: int = 8080
    bind: str = "127.0.0.1"
    database_url: str = DEFAULT_DATABASE_URL
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # How far the token issuer's clock may differ from this one (iat, nbf, exp), in seconds.
    jwt_leeway: float = 30.0
    dashboard_base_url: str = "https://dashboard.dembrane.com"
    # Delays in seconds before each retry, after the immediate first attempt.
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    retry_jitter: float = 0.2
    # A webhook failing for this long without a single success is disabled.
    disable_after_seconds: float = 5 * 86400
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    # Private ranges opened for outbound requests (development and tests only).
    allowed_targets: tuple[IPNetwork, ...] = ()
    retention_days: float = 30.0
    cors_origins: tuple[str, ...] = ()
    # How many requests the dispatcher has in flight at once, in all and per webhook.
    max_concurrency: int = 128
    per_webhook_concurrency: int = 8
    # How long a claimed delivery stays reserved to one dispatcher before it is due again.
    lease_seconds: float = 60.0
    log_level: str = "INFO"
    # SQLite's durability: FULL syncs every commit to disk before a publish call returns.
    sqlite_synchronous: str = "FULL"
    # Where the dispatcher journals outcomes until the store has them (``store/journal.py``):
    # a path to which it adds ``.<n>``. None: beside a SQLite file, and none on PostgreSQL.
    outcome_journal: str | None = None
    # Worker processes that send the dispatcher's requests; None: chosen from the cores.
    sender_processes: int | None = None
    # How much lower the sender processes' CPU priority is than the service's (``nice``).
    sender_nice: int = 10
    # The largest body one event may have; a bigger event is refused at publish time.
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    # A port serving /metrics on its own (for a ``worker``, which has no gateway); 0: none.
    metrics_port: int = 0
    # How many webhooks (archived ones aside) a project may have.
    max_webhooks_per_project: int = DEFAULT_MAX_WEBHOOKS_PER_PROJECT
    # Seconds between SIGTERM and refusing calls, health reporting NOT_SERVING meanwhile.
    shutdown_delay: float = 0.0
    # WEBHOOKS_* variables in the environment that no setting reads (misspelt, most likely).
    unknown_variables: tuple[str, ...] = field(default=(), compare=False)

    def check_ports(self, *, grpc: bool, http: bool, metrics: bool = True) -> None:
        """Raise ``ConfigError`` when two of the ports a command listens on are the same.

        Only the listeners the command opens count: a ``worker`` serving metrics on the REST
        port's default, 8080, takes nothing from anyone. Port 0 (a free port) never clashes.
        """
        ports = {
            "WEBHOOKS_GRPC_PORT": self.grpc_port if grpc else 0,
            "WEBHOOKS_HTTP_PORT": self.http_port if http else 0,
            "WEBHOOKS_METRICS_PORT": self.metrics_port if metrics else 0,
        }
        named = [(name, port) for name, port in ports.items() if port]
        for index, (name, port) in enumerate(named):
            for other, other_port in named[index + 1 :]:
                if port == other_port:
                    raise ConfigError(f"{name} and {other} must differ; both are {port}.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from ``env`` (the process environment by default)."""
        environment = os.environ if env is None else env
        reader = _Reader(environment)
        settings = cls._read(reader)
        unknown = sorted(
            name
            for name in environment
            if name.startswith(_PREFIXES)
            and not name.startswith(_TEST_PREFIX)
            and name not in reader.asked
        )
        if unknown:
            settings = replace(settings, unknown_variables=tuple(unknown))
        if settings.lease_seconds < settings.request_timeout + MIN_LEASE_OVER_REQUEST:
            raise ConfigError(
                f"WEBHOOKS_LEASE_SECONDS ({settings.lease_seconds:g}) must be at least "
                f"WEBHOOKS_REQUEST_TIMEOUT ({settings.request_timeout:g}) plus "
                f"{MIN_LEASE_OVER_REQUEST:g}: a lease has to outlast the request it covers, or "
                "another dispatcher sends the delivery again."
            )
        return settings

    def warnings(self, *, serving: bool = True, sending: bool = True) -> list[str]:
        """What is risky about these settings though the service can run with them; the
        token settings count only where calls are ``serving``, the allowed targets only
        where requests are ``sending``."""
        found = [_unknown_warning(name, self._known_names()) for name in self.unknown_variables]
        if serving:
            found += self._token_warnings()
        if not sending:
            return found
        opened = [
            str(network)
            for network in self.allowed_targets
            if network.prefixlen == 0 or any(ip in network for ip in _METADATA_ADDRESSES)
        ]
        if opened:
            found.append(
                f"WEBHOOKS_ALLOWED_TARGETS opens {', '.join(opened)}, which holds the cloud "
                "metadata address: a webhook could read this machine's credentials; open "
                "only the ranges of your own receivers"
            )
        return found

    def _token_warnings(self) -> list[str]:
        if not self.jwt_secret and not self.jwt_public_key:
            return [
                "neither WEBHOOKS_JWT_SECRET nor WEBHOOKS_JWT_PUBLIC_KEY is set: every call "
                "except health and reflection will be refused"
            ]
        if self.jwt_secret == DOCUMENTED_JWT_SECRET:
            return [
                "WEBHOOKS_JWT_SECRET is the development secret the README shows: anyone can "
                "mint tokens for this service, staff tokens included; set a secret of your "
                "own before others can reach it"
            ]
        if self.jwt_secret and len(self.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            return [
                f"WEBHOOKS_JWT_SECRET is {len(self.jwt_secret.encode())} bytes long: an HS256 "
                f"key shorter than {MIN_JWT_SECRET_BYTES} bytes can be found from any token "
                "by guessing; use a long random value"
            ]
        return []

    @classmethod
    def _known_names(cls) -> set[str]:
        reader = _Reader({})
        cls._read(reader)
        return reader.asked

    @classmethod
    def _read(cls, reader: _Reader) -> Settings:
        return cls(
            grpc_port=reader.port("WEBHOOKS_GRPC_PORT", 50051),
            http_port=reader.port("WEBHOOKS_HTTP_PORT", 8080),
            bind=reader.bind_address("WEBHOOKS_BIND", "127.0.0.1"),
            database_url=reader.database_url("WEBHOOKS_DATABASE_URL", DEFAULT_DATABASE_URL),
            jwt_secret=reader.optional("WEBHOOKS_JWT_SECRET"),
            jwt_public_key=reader.public_key("WEBHOOKS_JWT_PUBLIC_KEY"),
            jwt_issuer=reader.optional("WEBHOOKS_JWT_ISSUER"),
            jwt_audience=reader.optional("WEBHOOKS_JWT_AUDIENCE"),
            jwt_leeway=reader.number("WEBHOOKS_JWT_LEEWAY_SECONDS", 30.0, low=0.0, high=86400),
            dashboard_base_url=reader.base_url(
                "WEBHOOKS_DASHBOARD_BASE_URL", "https://dashboard.dembrane.com"
            ).rstrip("/"),
            retry_schedule=reader.schedule("WEBHOOKS_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE),
            retry_jitter=reader.number("WEBHOOKS_RETRY_JITTER", 0.2, low=0.0, high=1.0),
            disable_after_seconds=reader.number(
                "WEBHOOKS_DISABLE_AFTER_DAYS", 5.0, low=0.0, high=MAX_DAYS
            )
            * 86400,
            connect_timeout=reader.number(
                "WEBHOOKS_CONNECT_TIMEOUT", 10.0, low=0.001, high=MAX_TIMEOUT_SECONDS
            ),
            request_timeout=reader.number(
                "WEBHOOKS_REQUEST_TIMEOUT", 30.0, low=0.001, high=MAX_TIMEOUT_SECONDS
            ),
            allowed_targets=reader.networks("WEBHOOKS_ALLOWED_TARGETS"),
            retention_days=reader.number("WEBHOOKS_RETENTION_DAYS", 30.0, low=0.0, high=MAX_DAYS),
            cors_origins=reader.origins("WEBHOOKS_CORS_ORIGINS"),
            max_concurrency=reader.whole("WEBHOOKS_MAX_CONCURRENCY", 128, low=1, high=100_000),
            per_webhook_concurrency=reader.whole(
                "WEBHOOKS_PER_WEBHOOK_CONCURRENCY", 8, low=1, high=100_000
            ),
            lease_seconds=reader.number("WEBHOOKS_LEASE_SECONDS", 60.0, low=1.0, high=86400),
            log_level=reader.choice(
                "WEBHOOKS_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            ),
            sqlite_synchronous=reader.choice(
                "WEBHOOKS_SQLITE_SYNCHRONOUS", "FULL", ("FULL", "NORMAL", "EXTRA")
            ),
            outcome_journal=reader.optional("WEBHOOKS_OUTCOME_JOURNAL"),
            sender_processes=reader.count_or_auto("WEBHOOKS_SENDER_PROCESSES", high=64),
            sender_nice=reader.whole("WEBHOOKS_SENDER_NICE", 10, low=0, high=19),
            metrics_port=reader.port("WEBHOOKS_METRICS_PORT", 0),
            shutdown_delay=reader.number(
                "WEBHOOKS_SHUTDOWN_DELAY", 0.0, low=0.0, high=MAX_SHUTDOWN_DELAY_SECONDS
            ),
            max_webhooks_per_project=reader.whole(
                "WEBHOOKS_MAX_WEBHOOKS_PER_PROJECT",
                DEFAULT_MAX_WEBHOOKS_PER_PROJECT,
                low=1,
                high=100_000,
            ),
            max_event_bytes=reader.whole(
                "WEBHOOKS_MAX_EVENT_BYTES",
                DEFAULT_MAX_EVENT_BYTES,
                low=MIN_EVENT_BYTES,
                high=MAX_EVENT_BYTES_LIMIT,
            ),
        )


#: Names read as meant for this service; the second is the first missing its S.
_PREFIXES = ("WEBHOOKS_", "WEBHOOK_")
#: WEBHOOKS_TEST_* variables choose the test suite's database lane; the service ignores them.
_TEST_PREFIX = "WEBHOOKS_TEST_"


def _unknown_warning(name: str, known: set[str]) -> str:
    guess = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    hint = f"; did you mean {guess[0]}?" if guess else ""
    return f"{name} is not a setting of this service and is ignored{hint}"


# A decimal number as people type it in ASCII: float() also reads 1_000, nan and other
# scripts' digits.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _decimal(raw: str) -> float:
    """``raw`` as a number, or nan when it is not a plain decimal number."""
    return float(raw) if _DECIMAL.fullmatch(raw) else math.nan


#: Why a listener could not bind, by errno, as the start-up failure says it.
LISTEN_PROBLEMS = {
    errno.EADDRINUSE: "the port is taken",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
}


def url_host(host: str) -> str:
    """``host`` as it goes before ``:port`` in a URL or a gRPC target (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _shown(number: float) -> str:
    """A bound as people write it: 86400, not 86400.0 or 8.64e+04."""
    return str(int(number)) if number == int(number) else f"{number:g}"


#: The drivers a database URL may name, by its scheme: the ones the service connects with
#: ("" for none). ``psycopg2`` URLs, common elsewhere, take the same libpq parameters and are
#: served by psycopg 3.
_DRIVERS: dict[str, tuple[str, ...]] = {
    "sqlite": ("", "pysqlite"),
    "postgresql": ("", "psycopg", "psycopg2"),
    "postgres": ("", "psycopg", "psycopg2"),
}


class _Reader:
    """Parses environment values, naming the variable in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        #: Every variable asked for, so that the others can be found (a misspelt name).
        self.asked: set[str] = set()

    def optional(self, name: str) -> str | None:
        self.asked.add(name)
        value = self._env.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).upper()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}.")
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self.optional(name)
        if raw is None:
            return float(default)
        value = _decimal(raw)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a number, not {raw!r}.")
        if not low <= value <= high:
            raise ConfigError(
                f"{name} must be between {_shown(low)} and {_shown(high)}, not {raw!r}."
            )
        return value

    def bind_address(self, name: str, default: str) -> str:
        """An address to listen on: an IP literal, or a name that resolves to addresses."""
        value = self.text(name, default)
        try:
            # [::1] as well as ::1: the brackets belong to URLs, not to the address.
            return str(ipaddress.ip_address(value.removeprefix("[").removesuffix("]")))
        except ValueError:
            pass
        try:
            socket.getaddrinfo(value, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError):
            raise ConfigError(
                f"{name} must be an IP address to listen on (such as 127.0.0.1, 0.0.0.0 or ::) "
                f"or a host name that resolves, not {value!r}."
            ) from None
        return value

    def public_key(self, name: str) -> str | None:
        """A PEM public key (RSA or EC); a key that does not load would refuse every token
        without a word, so it stops start-up instead. Escaped newlines (``\\n``), as some
        platforms pass multi-line values, are read as line breaks."""
        value = self.optional(name)
        if value is None:
            return None
        if "\n" not in value and "\\n" in value:
            value = value.replace("\\n", "\n")
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(value.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ConfigError(
                f"{name} must be a PEM public key (RSA or EC), starting with "
                "-----BEGIN PUBLIC KEY-----."
            ) from None
        # Tokens are checked with RS256 or ES256 only: any other key (Ed25519, DSA, an EC
        # key on another curve than P-256) loads, then refuses every token.
        if not (
            isinstance(key, rsa.RSAPublicKey)
            or (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1")
        ):
            raise ConfigError(
                f"{name} must be an RSA key (for RS256) or an EC key on the P-256 curve (for "
                "ES256); tokens signed otherwise are not accepted."
            )
        return value

    def base_url(self, name: str, default: str) -> str:
        """An http or https URL that links are built under (``<base>/projects/...``): no
        spaces or control characters, no query and no fragment, which would end up in the
        middle of every link."""
        value = self.text(name, default)
        scheme, _, rest = value.partition("://")
        if scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
            raise ConfigError(f"{name} must be an http:// or https:// URL, not {value!r}.")
        if any(c.isspace() or not c.isprintable() for c in value) or "?" in rest or "#" in rest:
            raise ConfigError(
                f"{name} must be a URL without spaces, a query or a fragment (links are built "
                f"under it), not {value!r}."
            )
        return value

    def database_url(self, name: str, default: str) -> str:
        """A SQLite or PostgreSQL URL; any other kind, or no URL at all, is refused here
        rather than by a driver's traceback at start."""
        value = self.text(name, default)
        scheme = value.partition(":")[0].partition("+")[0].lower()
        if "://" not in value or scheme not in ("sqlite", "postgresql", "postgres"):
            raise ConfigError(
                f"{name} must be a sqlite:///path or postgresql://user@host:port/db URL."
            )
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
            port = url.port
        except (ArgumentError, ValueError):
            port, url = None, None
        if url is None or (port is not None and not 0 < port < 65536):
            raise ConfigError(
                f"{name} is not a URL the service can read; it must look like sqlite:///path "
                "or postgresql://user@host:port/db, the port a number."
            )
        driver = url.drivername.partition("+")[2].lower()
        if driver not in _DRIVERS[scheme]:
            example, connector = (
                ("sqlite:///path", "Python's sqlite3")
                if scheme == "sqlite"
                else ("postgresql://user@host:port/db", "psycopg 3")
            )
            raise ConfigError(
                f"{name} names the driver {driver!r}, which the service does not use; leave it "
                f"out ({example}): the service connects with {connector} itself."
            )
        if scheme != "sqlite":
            return value
        database = url.database or ":memory:"
        if database == ":memory:":
            # Everything would be gone when the process ends, acknowledged events included.
            raise ConfigError(
                f"{name} must name a SQLite file; an in-memory database loses every event "
                "when the service stops."
            )
        if url.query or database.startswith("file:"):
            raise ConfigError(
                f"{name} must be sqlite:///path without query parameters or a file: URI; "
                "the service sets SQLite's options itself."
            )
        return value

    def whole(self, name: str, default: int, *, low: int, high: int) -> int:
        """A whole number from ``low`` to ``high``, written as digits (no 1e3, no 1.5)."""
        raw = self.optional(name)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {raw!r}.")
        return int(raw)

    def count_or_auto(self, name: str, *, high: int) -> int | None:
        raw = self.optional(name)
        if raw is None or raw.lower() == "auto":
            return None
        if not (raw.isascii() and raw.isdigit()) or int(raw) > high:
            raise ConfigError(f"{name} must be 'auto' or a whole number from 0 to {high}.")
        return int(raw)

    def port(self, name: str, default: int) -> int:
        return self.whole(name, default, low=0, high=65535)

    def items(self, name: str) -> tuple[str, ...]:
        raw = self.optional(name) or ""
        return tuple(item.strip() for item in raw.split(",") if item.strip())

    def origins(self, name: str) -> tuple[str, ...]:
        """Browser origins (``scheme://host[:port]``, as a browser sends them) or ``*``."""
        origins: list[str] = []
        for origin in self.items(name):
            match = _ORIGIN.fullmatch(origin)
            if origin != "*" and (match is None or "*" in origin):
                raise ConfigError(
                    f"{name} must list origins such as https://app.example.com (scheme, host "
                    f"and optional port, no path, no wildcard) or *, not {origin!r}."
                )
            if match is not None:
                # As a browser sends it: lower case, and no port where it is the default.
                scheme, host, port = origin.split("://", 1)[0].lower(), match[1].lower(), match[2]
                if port in (None, ":443" if scheme == "https" else ":80"):
                    port = ""
                origin = f"{scheme}://{host}{port}"
            origins.append(origin)
        return tuple(origins)

    def schedule(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        raw = self.optional(name)
        if raw is None:
            return default
        delays: list[float] = []
        for item in raw.split(","):
            delay = _decimal(item.strip())
            if not math.isfinite(delay):
                raise ConfigError(
                    f"{name} must list delays in seconds, comma-separated, not {raw!r}."
                )
            if delay < 0:
                raise ConfigError(f"{name} must not hold negative delays.")
            if delay > MAX_RETRY_DELAY_SECONDS:
                raise ConfigError(
                    f"{name} must not hold a delay over {MAX_RETRY_DELAY_SECONDS} seconds "
                    f"(30 days), not {item.strip()!r}."
                )
            delays.append(delay)
        if len(delays) > MAX_RETRY_SLOTS:
            raise ConfigError(f"{name} must hold at most {MAX_RETRY_SLOTS} delays.")
        return tuple(delays)

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        networks: list[IPNetwork] = []
        for item in self.items(name):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(f"{name} holds {item!r}, which is not a CIDR range.") from None
        return tuple(networks)
