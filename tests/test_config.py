"""Settings come from the environment, and bad values stop the service with a clear message."""

from __future__ import annotations

import ipaddress

import pytest

from dembrane.webhooks.config import DEFAULT_RETRY_SCHEDULE, ConfigError, Settings
from dembrane.webhooks.store.database import normalize_url


def test_defaults_are_the_contracts() -> None:
    """Without variables the service listens on 127.0.0.1:50051/8080 with the default schedule."""
    settings = Settings.from_env({})
    assert (settings.bind, settings.grpc_port, settings.http_port) == ("127.0.0.1", 50051, 8080)
    assert (
        settings.retry_schedule
        == DEFAULT_RETRY_SCHEDULE
        == (5, 300, 1800, 7200, 18000, 36000, 36000)
    )
    assert settings.database_url == "sqlite:///var/webhooks.db"
    assert (settings.connect_timeout, settings.request_timeout) == (10.0, 30.0)
    assert settings.disable_after_seconds == 5 * 86400
    assert settings.retention_days == 30
    assert settings.max_event_bytes == 4 * 1024 * 1024
    assert settings.outcome_journal is None


def test_variables_are_read() -> None:
    """Every contract variable is taken from the environment."""
    settings = Settings.from_env(
        {
            "WEBHOOKS_HTTP_PORT": "9000",
            "WEBHOOKS_RETRY_SCHEDULE": "1, 1,1",
            "WEBHOOKS_ALLOWED_TARGETS": "127.0.0.0/8, ::1/128",
            "WEBHOOKS_CORS_ORIGINS": "https://app.example.com",
            "WEBHOOKS_DASHBOARD_BASE_URL": "https://dash.example.com/",
            "WEBHOOKS_MAX_EVENT_BYTES": "1048576",
            "WEBHOOKS_METRICS_PORT": "9102",
            "WEBHOOKS_OUTCOME_JOURNAL": " /var/lib/webhooks/outcomes ",
        }
    )
    assert settings.metrics_port == 9102
    assert settings.outcome_journal == "/var/lib/webhooks/outcomes"
    assert settings.max_event_bytes == 1048576
    assert settings.http_port == 9000
    assert settings.retry_schedule == (1.0, 1.0, 1.0)
    assert settings.allowed_targets == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert settings.cors_origins == ("https://app.example.com",)
    assert settings.dashboard_base_url == "https://dash.example.com"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WEBHOOKS_GRPC_PORT", "http"),
        ("WEBHOOKS_HTTP_PORT", "70000"),
        ("WEBHOOKS_RETRY_SCHEDULE", "1,soon"),
        ("WEBHOOKS_RETRY_SCHEDULE", "-5"),
        ("WEBHOOKS_ALLOWED_TARGETS", "not-a-network"),
        ("WEBHOOKS_SQLITE_SYNCHRONOUS", "SOMETIMES"),
        ("WEBHOOKS_LOG_LEVEL", "LOUD"),
        ("WEBHOOKS_DATABASE_URL", "garbage"),
        ("WEBHOOKS_DATABASE_URL", "mysql://u@h/db"),
        ("WEBHOOKS_JWT_LEEWAY_SECONDS", "-1"),
        ("WEBHOOKS_MAX_EVENT_BYTES", "100"),
        ("WEBHOOKS_MAX_EVENT_BYTES", "1000000000"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    """A value the service cannot use raises an error naming the variable."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, None), ("auto", None), ("AUTO", None), ("0", 0), ("3", 3)]
)
def test_sender_processes_are_auto_or_a_count(raw: str | None, expected: int | None) -> None:
    """WEBHOOKS_SENDER_PROCESSES takes 'auto' (the default) or a whole number of processes."""
    env = {} if raw is None else {"WEBHOOKS_SENDER_PROCESSES": raw}
    assert Settings.from_env(env).sender_processes == expected


@pytest.mark.parametrize(("raw", "expected"), [(None, 10), ("0", 0), ("19", 19)])
def test_sender_nice_is_a_step_below_the_service(raw: str | None, expected: int) -> None:
    """WEBHOOKS_SENDER_NICE takes 0 to 19 and defaults to 10."""
    env = {} if raw is None else {"WEBHOOKS_SENDER_NICE": raw}
    assert Settings.from_env(env).sender_nice == expected


@pytest.mark.parametrize("raw", ["-5", "20", "high", "2.5"])
def test_bad_sender_nice_names_the_variable(raw: str) -> None:
    """A niceness the service cannot set (a raise of priority, or beyond 19) is refused at
    start with a message naming the variable."""
    with pytest.raises(ConfigError, match="WEBHOOKS_SENDER_NICE"):
        Settings.from_env({"WEBHOOKS_SENDER_NICE": raw})


@pytest.mark.parametrize(("raw", "expected"), [(None, 0.0), ("0", 0.0), ("2.5", 2.5), ("300", 300)])
def test_shutdown_delay_is_seconds_up_to_five_minutes(raw: str | None, expected: float) -> None:
    """WEBHOOKS_SHUTDOWN_DELAY takes 0 to 300 seconds and defaults to none."""
    env = {} if raw is None else {"WEBHOOKS_SHUTDOWN_DELAY": raw}
    assert Settings.from_env(env).shutdown_delay == expected


@pytest.mark.parametrize("raw", ["-1", "301", "soon", "nan"])
def test_bad_shutdown_delay_names_the_variable(raw: str) -> None:
    """A delay below zero, beyond five minutes or not a number is refused at start with a
    message naming the variable."""
    with pytest.raises(ConfigError, match="WEBHOOKS_SHUTDOWN_DELAY"):
        Settings.from_env({"WEBHOOKS_SHUTDOWN_DELAY": raw})


@pytest.mark.parametrize("raw", ["-1", "two", "1.5", "65", "\u00b2", "\u0663"])
def test_bad_sender_processes_name_the_variable(raw: str) -> None:
    """A bad process count stops start-up with a message naming the variable."""
    with pytest.raises(ConfigError, match="WEBHOOKS_SENDER_PROCESSES"):
        Settings.from_env({"WEBHOOKS_SENDER_PROCESSES": raw})


@pytest.mark.parametrize(
    ("lease", "timeout", "ok"),
    [("60", "30", True), ("34", "30", True), ("33.9", "30", False), ("5", None, False)],
)
def test_a_lease_must_outlast_a_request(lease: str, timeout: str | None, ok: bool) -> None:
    """A lease shorter than a request and a margin is refused at start-up: another dispatcher
    would take the delivery over while its request still runs, and send it twice."""
    env = {"WEBHOOKS_LEASE_SECONDS": lease}
    if timeout is not None:
        env["WEBHOOKS_REQUEST_TIMEOUT"] = timeout
    if ok:
        assert Settings.from_env(env).lease_seconds == float(lease)
    else:
        with pytest.raises(
            ConfigError, match=r"WEBHOOKS_LEASE_SECONDS .* WEBHOOKS_REQUEST_TIMEOUT"
        ):
            Settings.from_env(env)


def test_a_value_out_of_range_names_both_bounds_as_written() -> None:
    """A number outside its range is refused with both bounds, each as people write it."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOKS_CONNECT_TIMEOUT": "0"})
    assert str(caught.value) == (
        "WEBHOOKS_CONNECT_TIMEOUT must be between 0.001 and 3600, not '0'."
    )


def test_a_database_url_with_a_password_is_not_echoed() -> None:
    """A refused database URL is not repeated in the message: it may hold a password."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOKS_DATABASE_URL": "mysql://user:hunter2@db/x"})
    assert "hunter2" not in str(caught.value)


def _ec_public_pem() -> str:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def test_a_public_key_must_load() -> None:
    """A JWT public key that is not a PEM key stops start-up (it would refuse every token in
    silence); a PEM key passed with escaped newlines is read as the key."""
    with pytest.raises(ConfigError, match="WEBHOOKS_JWT_PUBLIC_KEY"):
        Settings.from_env({"WEBHOOKS_JWT_PUBLIC_KEY": "garbage"})
    pem = _ec_public_pem()
    escaped = pem.strip().replace("\n", "\\n")
    assert Settings.from_env({"WEBHOOKS_JWT_PUBLIC_KEY": escaped}).jwt_public_key == pem.strip()


def _public_pem(key: object) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()  # type: ignore[attr-defined]


def test_a_public_key_must_suit_rs256_or_es256() -> None:
    """Tokens are checked with RS256 or ES256 only, so a key of another kind (Ed25519, an EC
    key on P-384), which would load and then refuse every token, stops start-up."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    for key in (
        ed25519.Ed25519PrivateKey.generate().public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
    ):
        with pytest.raises(ConfigError, match="WEBHOOKS_JWT_PUBLIC_KEY must be an RSA key"):
            Settings.from_env({"WEBHOOKS_JWT_PUBLIC_KEY": _public_pem(key)})
    rsa_pem = _public_pem(rsa.generate_private_key(65537, 2048).public_key())
    assert Settings.from_env({"WEBHOOKS_JWT_PUBLIC_KEY": rsa_pem}).jwt_public_key == rsa_pem.strip()


@pytest.mark.parametrize(
    "value",
    [
        "not a url",
        "ftp://files.example.com",
        "https://",
        "https://exa mple.com",
        "https://dash.example.com?x=1",
        "https://dash.example.com/#top",
    ],
)
def test_the_dashboard_base_url_must_be_http(value: str) -> None:
    """The dashboard link in every body is built under this URL: it must be an http(s) URL
    with a host, and without spaces, a query or a fragment, which would end up inside it."""
    with pytest.raises(ConfigError, match="WEBHOOKS_DASHBOARD_BASE_URL"):
        Settings.from_env({"WEBHOOKS_DASHBOARD_BASE_URL": value})


@pytest.mark.parametrize("value", ["not an origin", "https://app.example.com/path", "app.io"])
def test_cors_origins_must_be_origins(value: str) -> None:
    """An entry of WEBHOOKS_CORS_ORIGINS that no browser could send as Origin stops start-up."""
    with pytest.raises(ConfigError, match="WEBHOOKS_CORS_ORIGINS"):
        Settings.from_env({"WEBHOOKS_CORS_ORIGINS": value})


def test_cors_origins_take_ports_and_the_wildcard() -> None:
    """Origins with a port, and *, are accepted as given."""
    env = {"WEBHOOKS_CORS_ORIGINS": "http://localhost:5173, http://[::1]:8080, *"}
    assert Settings.from_env(env).cors_origins == (
        "http://localhost:5173",
        "http://[::1]:8080",
        "*",
    )


@pytest.mark.parametrize("raw", ["not-an-addr", "256.1.1.1", "exa mple"])
def test_a_bind_address_that_is_no_address_names_the_variable(raw: str) -> None:
    """WEBHOOKS_BIND must be an IP literal or a resolvable name: otherwise a setting error
    (exit status 2) rather than a failure to listen that blames the port."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOKS_BIND": raw})
    assert str(caught.value).startswith("WEBHOOKS_BIND must be an IP address to listen on")
    assert repr(raw) in str(caught.value)


@pytest.mark.parametrize("raw", ["0.0.0.0", "::", "::1", "localhost"])
def test_a_bind_address_may_be_a_literal_or_a_name(raw: str) -> None:
    """IPv4 and IPv6 literals (bracketed or not) and names that resolve are taken as given."""
    assert Settings.from_env({"WEBHOOKS_BIND": raw}).bind == raw


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
def test_a_number_setting_refuses_nan_and_infinity(raw: str) -> None:
    """nan compares false with every bound, so it would pass a range check; it is refused."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOKS_REQUEST_TIMEOUT": raw})
    assert str(caught.value) == f"WEBHOOKS_REQUEST_TIMEOUT must be a number, not {raw!r}."


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("WEBHOOKS_MAX_EVENT_BYTES", "999999999999"),
        ("WEBHOOKS_MAX_EVENT_BYTES", "nan"),
        ("WEBHOOKS_GRPC_PORT", "1e3"),
        ("WEBHOOKS_GRPC_PORT", "nan"),
        ("WEBHOOKS_MAX_CONCURRENCY", "inf"),
        ("WEBHOOKS_PER_WEBHOOK_CONCURRENCY", "1.5"),
        ("WEBHOOKS_MAX_WEBHOOKS_PER_PROJECT", "-1"),
    ],
)
def test_whole_number_settings_take_digits_only(name: str, raw: str) -> None:
    """Counts, sizes and ports are whole numbers written as digits, within their range: 1e3
    is not a port and 1.5 requests are not cut to one."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: raw})
    assert str(caught.value).startswith(f"{name} must be a whole number from ")
    assert repr(raw) in str(caught.value)


def test_a_whole_number_range_names_its_bounds_as_written() -> None:
    """Whole-number bounds read as whole numbers, not in scientific notation."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOKS_MAX_EVENT_BYTES": "999999999999"})
    assert "from 4096 to 33554432" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [("1e300", "over 2592000 seconds"), ("5,inf", "must list delays"), ("nan", "must list")],
)
def test_a_retry_delay_must_be_finite_and_at_most_30_days(raw: str, fragment: str) -> None:
    """A delay of inf, nan or beyond 30 days would overflow the due time of a retry."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOKS_RETRY_SCHEDULE": raw})
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///:memory:", "sqlite://"],
)
def test_an_in_memory_database_is_refused(url: str) -> None:
    """An in-memory SQLite database would lose every acknowledged event at exit."""
    with pytest.raises(ConfigError, match="in-memory database loses every event"):
        Settings.from_env({"WEBHOOKS_DATABASE_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///file:x?mode=memory&uri=true",
        "sqlite:///file::memory:?cache=shared",
        "sqlite:///var/x.db?mode=ro",
        "sqlite:///file:x.db",
    ],
)
def test_a_sqlite_url_with_options_is_refused(url: str) -> None:
    """Query parameters and file: URIs were ignored (a file named 'file::memory:' appeared);
    they are refused, since the service sets SQLite's options itself."""
    with pytest.raises(ConfigError, match="without query parameters or a file: URI"):
        Settings.from_env({"WEBHOOKS_DATABASE_URL": url})


def test_a_database_url_whose_port_is_no_number_is_a_sentence() -> None:
    """A PostgreSQL URL with a port that is no number stops start-up with a sentence naming
    the variable, and without the URL (it may hold a password)."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOKS_DATABASE_URL": "postgresql://u:pw@h:notaport/db"})
    assert str(caught.value).startswith("WEBHOOKS_DATABASE_URL is not a URL the service")
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://u:pw@h/db",
        "postgresql+pg8000://u:pw@h/db",
        "postgresql+bogus://u:pw@h/db",
        "sqlite+aiosqlite:///var/x.db",
        "sqlite+pysqlcipher:///var/x.db",
    ],
)
def test_a_database_url_naming_a_driver_the_service_lacks_is_a_sentence(url: str) -> None:
    """A driver the service does not connect with is refused with one sentence naming it
    (it used to be a traceback of a missing module at start), without the password."""
    with pytest.raises(ConfigError, match="names the driver") as caught:
        Settings.from_env({"WEBHOOKS_DATABASE_URL": url})
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db", "sqlite+pysqlite:///x.db"],
)
def test_a_database_url_naming_a_driver_it_serves_is_taken(url: str) -> None:
    """psycopg2 URLs, common elsewhere, are served by psycopg 3 (same libpq parameters)."""
    assert Settings.from_env({"WEBHOOKS_DATABASE_URL": url}).database_url == url
    assert normalize_url(url).startswith(("postgresql+psycopg://", "sqlite"))


def test_a_misspelt_variable_is_warned_about_with_a_guess() -> None:
    """A WEBHOOKS_ variable no setting reads is named in a warning, with the setting it most
    resembles; the test suite's own WEBHOOKS_TEST_ variables are not."""
    settings = Settings.from_env(
        {
            "WEBHOOKS_RETRY_SHEDULE": "1,2",
            "WEBHOOKS_COLOUR": "blue",
            "WEBHOOKS_TEST_BACKEND": "postgres",
            "HOME": "/root",
        }
    )
    assert settings.unknown_variables == ("WEBHOOKS_COLOUR", "WEBHOOKS_RETRY_SHEDULE")
    warnings = settings.warnings(serving=False)
    assert warnings == [
        "WEBHOOKS_COLOUR is not a setting of this service and is ignored",
        "WEBHOOKS_RETRY_SHEDULE is not a setting of this service and is ignored; "
        "did you mean WEBHOOKS_RETRY_SCHEDULE?",
    ]


def test_risky_settings_are_warned_about() -> None:
    """The README's development secret and allowed targets holding the cloud metadata
    address start the service with a warning each; a worker, which serves no calls, is not
    warned about token settings."""
    risky = Settings(
        jwt_secret="dev-only-secret-never-use-in-production",
        allowed_targets=(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("10.0.0.0/8")),
    )
    warnings = risky.warnings()
    assert len(warnings) == 2
    assert warnings[0].startswith("WEBHOOKS_JWT_SECRET is the development secret the README")
    assert warnings[1].startswith("WEBHOOKS_ALLOWED_TARGETS opens 0.0.0.0/0, which holds")
    assert risky.warnings(serving=False) == warnings[1:]
    assert (
        Settings(jwt_secret="x" * 40, allowed_targets=(ipaddress.ip_network("169.254.0.0/16"),))
        .warnings()[0]
        .startswith("WEBHOOKS_ALLOWED_TARGETS opens 169.254.0.0/16")
    )
    assert (
        Settings(
            jwt_secret="x" * 40, allowed_targets=(ipaddress.ip_network("127.0.0.0/8"),)
        ).warnings()
        == []
    )


def test_a_short_jwt_secret_is_warned_about() -> None:
    """An HS256 secret under 32 bytes starts the service with a warning naming its length;
    32 bytes or a public key alone raise none, and no key at all is warned about."""
    assert Settings(jwt_secret="x" * 31).warnings() == [
        "WEBHOOKS_JWT_SECRET is 31 bytes long: an HS256 key shorter than 32 bytes can be "
        "found from any token by guessing; use a long random value"
    ]
    assert Settings(jwt_secret="é" * 16).warnings() == []
    assert Settings(jwt_public_key="PEM").warnings() == []
    assert "every call except health and reflection will be refused" in Settings().warnings()[0]


def test_the_webhook_limit_per_project_is_read() -> None:
    """WEBHOOKS_MAX_WEBHOOKS_PER_PROJECT sets the limit (100 by default) and must be positive."""
    assert Settings.from_env({}).max_webhooks_per_project == 100
    assert (
        Settings.from_env({"WEBHOOKS_MAX_WEBHOOKS_PER_PROJECT": "5"}).max_webhooks_per_project == 5
    )
    with pytest.raises(ConfigError):
        Settings.from_env({"WEBHOOKS_MAX_WEBHOOKS_PER_PROJECT": "0"})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("WEBHOOKS_RETRY_SCHEDULE", "1_000"),
        ("WEBHOOKS_RETENTION_DAYS", "\u0661"),
        ("WEBHOOKS_REQUEST_TIMEOUT", "1_0"),
        ("WEBHOOKS_RETRY_JITTER", "0x1"),
    ],
)
def test_numbers_are_plain_ascii_decimals(name: str, raw: str) -> None:
    """Python reads 1_000 and other scripts' digits as numbers; settings take plain decimals
    only, as the port and count settings already did."""
    with pytest.raises(ConfigError):
        Settings.from_env({name: raw})


@pytest.mark.parametrize("raw", ["[::1]", "::1", "[::]"])
def test_a_bracketed_ipv6_bind_address_is_taken_without_brackets(raw: str) -> None:
    """WEBHOOKS_BIND=[::1] is the address ::1; the brackets belong to URLs."""
    assert Settings.from_env({"WEBHOOKS_BIND": raw}).bind == raw.strip("[]")


@pytest.mark.parametrize(
    "env",
    [
        {"WEBHOOKS_GRPC_PORT": "9000", "WEBHOOKS_HTTP_PORT": "9000"},
        {"WEBHOOKS_METRICS_PORT": "50051"},
        {"WEBHOOKS_HTTP_PORT": "9100", "WEBHOOKS_METRICS_PORT": "9100"},
    ],
)
def test_two_listeners_on_one_port_are_refused(env: dict[str, str]) -> None:
    """The gRPC, REST and metrics ports that serve opens must differ (0, for a free port,
    aside)."""
    with pytest.raises(ConfigError, match="must differ"):
        Settings.from_env(env).check_ports(grpc=True, http=True)
    free = Settings.from_env({"WEBHOOKS_GRPC_PORT": "0", "WEBHOOKS_HTTP_PORT": "0"})
    free.check_ports(grpc=True, http=True)


def test_ports_a_command_does_not_open_may_be_shared() -> None:
    """A worker (metrics only) may serve metrics on the REST port's default, and a gateway
    (REST and metrics) on the gRPC port's: neither listens on the other port."""
    worker = Settings.from_env({"WEBHOOKS_METRICS_PORT": "8080"})
    worker.check_ports(grpc=False, http=False)
    gateway = Settings.from_env({"WEBHOOKS_METRICS_PORT": "50051"})
    gateway.check_ports(grpc=False, http=True)
    with pytest.raises(ConfigError, match="WEBHOOKS_HTTP_PORT and WEBHOOKS_METRICS_PORT"):
        worker.check_ports(grpc=False, http=True)


def test_a_variable_missing_the_s_of_the_prefix_is_warned_about() -> None:
    """WEBHOOK_HTTP_PORT (no S) is most likely meant for this service: it is named, with the
    setting it resembles."""
    settings = Settings.from_env({"WEBHOOK_HTTP_PORT": "9000"})
    assert settings.warnings(serving=False) == [
        "WEBHOOK_HTTP_PORT is not a setting of this service and is ignored; "
        "did you mean WEBHOOKS_HTTP_PORT?"
    ]


def test_origins_are_kept_as_a_browser_sends_them() -> None:
    """Upper-case hosts and default ports are normalised (a browser sends neither, so such
    an entry could never match), other ports are kept, and wildcard hosts are refused."""
    settings = Settings.from_env(
        {
            "WEBHOOKS_CORS_ORIGINS": (
                "HTTPS://App.Dembrane.com, https://a.example:443, http://b.example:80, "
                "http://c.example:8080, *"
            )
        }
    )
    assert settings.cors_origins == (
        "https://app.dembrane.com",
        "https://a.example",
        "http://b.example",
        "http://c.example:8080",
        "*",
    )
    with pytest.raises(ConfigError, match="no wildcard"):
        Settings.from_env({"WEBHOOKS_CORS_ORIGINS": "https://*.dembrane.com"})
