"""The ``dembrane-webhooks`` command: serve, worker, gateway, token, migrate, demo.

Every setting comes from the environment (see ``config.py``); flags only choose what runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from dembrane.webhooks import __version__, heap
from dembrane.webhooks.auth import TokenVerifier, mint_token
from dembrane.webhooks.config import ConfigError, Settings, url_host
from dembrane.webhooks.service import Parts, Service, StartupError, file_problem, start_metrics
from dembrane.webhooks.store.database import describe_store_error

log = logging.getLogger("dembrane.webhooks")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dembrane-webhooks", description="Durable, signed webhook delivery."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run gRPC, the REST gateway and the dispatcher")
    serve.add_argument("--no-dispatcher", action="store_true", help="do not deliver here")
    serve.add_argument("--no-gateway", action="store_true", help="do not serve REST here")

    commands.add_parser("worker", help="run only the dispatcher")

    gateway = commands.add_parser("gateway", help="run only the REST gateway")
    gateway.add_argument(
        "--grpc-target", required=True, metavar="HOST:PORT", help="the gRPC server to call"
    )

    commands.add_parser("migrate", help="create or upgrade the database schema, then exit")

    token = commands.add_parser("token", help="print a bearer token signed with the HS256 secret")
    token.add_argument("--sub", required=True, help="the user id (the token's sub claim)")
    token.add_argument(
        "--scope",
        action="append",
        default=[],
        help="a service scope, e.g. webhooks:publish or webhooks:directory (repeatable)",
    )
    token.add_argument("--staff", action="store_true", help="mark the caller as platform staff")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (3600)")

    demo = commands.add_parser(
        "demo",
        help="show an event's way to a receiver: a throwaway service on this machine",
    )
    demo.add_argument(
        "--keep", action="store_true", help="keep the demo's database and say where it is"
    )
    return parser


#: How long, in seconds, a thread of the service runs before it lets another take the
#: interpreter lock (``sys.setswitchinterval``).
SWITCH_INTERVAL = 0.001


async def _serve_until_signalled(service: Service) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A signal during start-up (a database that does not answer yet) stops it there, rather
    # than once every part has started.
    starting = asyncio.ensure_future(service.start())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if not starting.done():
        log.info("shutting down before start-up finished")
        starting.cancel()
        # ``start`` stops the parts already started before it gives up.
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    starting.result()
    heap.settle()
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight calls and deliveries")
    finally:
        await service.stop()


async def _run_gateway(settings: Settings, grpc_target: str) -> None:
    from dembrane.webhooks.gateway.app import announce_stop, create_app, run_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics = start_metrics(settings)
    try:
        runner = await run_gateway(
            create_app(
                grpc_target=grpc_target,
                cors_origins=settings.cors_origins,
                # With the server's key set here too, a bad token is refused before anything
                # else about its request; without it, the server judges tokens.
                verifier=TokenVerifier(settings),
            ),
            settings.bind,
            settings.http_port,
        )
        log.info(
            "REST gateway on %s:%s calling %s",
            url_host(settings.bind),
            settings.http_port,
            grpc_target,
        )
        try:
            await stop.wait()
            if settings.shutdown_delay > 0:
                log.info(
                    "shutting down in %g s: /healthz answers 503 meanwhile", settings.shutdown_delay
                )
                announce_stop(runner.app)
                await asyncio.sleep(settings.shutdown_delay)
        finally:
            await runner.cleanup()
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed (it is on Linux), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main)
        return
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main)


def _run_for_status(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` as ``_run`` does and return its result (130, as a shell reports Ctrl-C,
    when it was interrupted before it could give one)."""
    result: list[int] = []

    async def keep_result() -> None:
        result.append(await main)

    _run(keep_result())
    return result[0] if result else 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        # The demo sets up everything itself and reads nothing from the environment.
        try:
            from dembrane.webhooks.demo import run_demo
        except KeyboardInterrupt:
            return 130

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return _run_for_status(run_demo(sys.stdout, keep=args.keep))
        except (OSError, StartupError) as error:
            return _failed(error)
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"dembrane-webhooks: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Migration chatter says nothing an operator needs on every start, nor gRPC's asyncio
    # layer's line per call at DEBUG ("Loaded running loop").
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("grpc._cython").setLevel(max(logging.INFO, logging.getLogger().level))
    if args.command == "token":
        if not settings.jwt_secret:
            print("dembrane-webhooks: set WEBHOOKS_JWT_SECRET to mint tokens.", file=sys.stderr)
            return 2
        if not args.sub.strip() or args.ttl <= 0:
            message = "--sub must name a user and --ttl be positive."
            print(f"dembrane-webhooks: {message}", file=sys.stderr)
            return 2
        print(
            mint_token(
                settings.jwt_secret,
                args.sub,
                scopes=args.scope,
                staff=args.staff,
                ttl_seconds=args.ttl,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
            )
        )
        return 0
    if args.command == "migrate":
        from dembrane.webhooks.store.database import Database, SchemaError

        for warning in settings.warnings(serving=False, sending=False):
            log.warning("%s", warning)
        try:
            database = Database(settings.database_url)
            database.migrate()
        except SchemaError as error:
            return _failed(StartupError(f"cannot use the database: {error}"))
        except OSError as error:
            return _failed(StartupError(file_problem(error)))
        except SQLAlchemyError as error:
            return _failed(error)
        log.info("database: %s is up to date", database.describe())
        return 0
    try:
        # Only the listeners this command opens must not share a port.
        if args.command == "gateway":
            settings.check_ports(grpc=False, http=True)
        elif args.command == "worker":
            settings.check_ports(grpc=False, http=False)
        elif args.command == "serve":
            settings.check_ports(grpc=True, http=not args.no_gateway)
    except ConfigError as error:
        print(f"dembrane-webhooks: {error}", file=sys.stderr)
        return 2
    if args.command == "gateway":
        problem = _target_problem(args.grpc_target)
        if problem is not None:
            print(f"dembrane-webhooks: {problem}", file=sys.stderr)
            return 2
        # A gateway without token settings leaves tokens to the server: nothing to warn of.
        checks_tokens = bool(settings.jwt_secret or settings.jwt_public_key)
        for warning in settings.warnings(serving=checks_tokens, sending=False):
            log.warning("%s", warning)
        try:
            _run(_run_gateway(settings, args.grpc_target))
        except (OSError, StartupError) as error:
            return _failed(error)
        return 0
    for warning in settings.warnings(serving=args.command != "worker"):
        log.warning("%s", warning)
    if args.command == "worker":
        parts = Parts(grpc=False, gateway=False, dispatcher=True)
    else:
        parts = Parts(grpc=True, gateway=not args.no_gateway, dispatcher=not args.no_dispatcher)
    # The store's thread gives the interpreter lock up at every SQLite call and waits for
    # the event loop to hand it back; the loop hands it over after this long at most. At
    # 1 ms rather than Python's 5 ms, publish acknowledgements took 0.88-0.89x as long at
    # the median in two runs of ``python -m bench.compare`` (8 rounds each), with the same
    # CPU per event.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        _run(_serve_until_signalled(Service(settings, parts)))
    except (OSError, StartupError, SQLAlchemyError) as error:
        return _failed(error)
    return 0


def _target_problem(target: str) -> str | None:
    """What is wrong with a ``--grpc-target`` (``HOST:PORT``, an IPv6 host in brackets)."""
    host, _, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # A URL (http://host:port) names a scheme gRPC's target syntax would take for a host.
    plain_host = bool(host) and "/" not in host and not any(c.isspace() for c in host)
    if plain_host and (port.isascii() and port.isdigit()) and 0 < int(port) < 65536:
        return None
    return f"--grpc-target must be HOST:PORT, such as 127.0.0.1:50051, not {target!r}."


def _failed(error: Exception) -> int:
    """Report a start-up failure in one line (no traceback); the exit status."""
    if isinstance(error, SQLAlchemyError):
        # The driver's own sentence; SQLAlchemy adds the statement and a link below it.
        message = (
            f"cannot use the database WEBHOOKS_DATABASE_URL names: {describe_store_error(error)}"
        )
    else:
        message = str(error)
    print(f"dembrane-webhooks: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
