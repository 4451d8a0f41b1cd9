"""The ``demo`` command: a throwaway service, a real receiver, and what it shows."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dembrane.webhooks.demo import run_demo

# The demo always runs on its own SQLite file, whatever the lane's database.
pytestmark = pytest.mark.sqlite_only


async def test_the_demo_delivers_every_event_type_signed_and_retries_a_refusal() -> None:
    """The demo's receiver verifies both signatures of every request, its 503 is retried with
    the same delivery, and the delivery log shows all four events succeeded."""
    out = io.StringIO()
    assert await run_demo(out) == 0
    text = out.getvalue()
    for event_type in (
        "conversation.started",
        "conversation.transcribed",
        "conversation.summarized",
        "report.generated",
    ):
        assert re.search(rf"{re.escape(event_type)} +succeeded ", text), text
    assert "conversation.transcribed  succeeded  2 attempts: 503, then 200" in text
    assert "INVALID" not in text
    assert text.count("both signatures valid") == 5
    assert "its database is gone" in text


def test_the_demo_removes_its_database_unless_asked_to_keep_it() -> None:
    """Without ``--keep`` nothing of the demo is left; with it, the folder it names holds the
    database."""
    out = io.StringIO()
    assert asyncio.run(run_demo(out)) == 0
    gone = re.search(r"SQLite +(\S+)", out.getvalue())
    assert gone is not None
    assert not Path(gone.group(1)).exists()

    kept_out = io.StringIO()
    assert asyncio.run(run_demo(kept_out, keep=True)) == 0
    kept = re.search(r"The database is kept in (\S+)\.", kept_out.getvalue())
    assert kept is not None
    folder = Path(kept.group(1))
    try:
        assert (folder / "demo.db").is_file()
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_the_demo_command_needs_nothing_from_the_environment(tmp_path: Path) -> None:
    """``dembrane-webhooks demo`` runs with none of the service's settings and even with a
    setting that ``serve`` would refuse, and exits 0."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WEBHOOKS_GRPC_PORT": "not-a-port"}
    done = subprocess.run(
        [sys.executable, "-m", "dembrane.webhooks.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "both signatures valid" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("after", ["1.", "4."])
def test_ctrl_c_stops_the_demo_cleanly(after: str, tmp_path: Path) -> None:
    """Ctrl-C at any step ends the demo with status 130, a one-line note and no traceback,
    and the throwaway database is gone."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "dembrane.webhooks.cli", "demo"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        seen: list[str] = []
        for line in demo.stdout:
            seen.append(line)
            if line.startswith(after):
                demo.send_signal(signal.SIGINT)
                break
        # Read through the same buffered file as above (communicate() would read the pipe
        # itself and miss what the line iterator has already buffered).
        rest = demo.stdout.read()
        demo.wait(timeout=60)
        assert demo.stderr is not None
        errors = demo.stderr.read()
    finally:
        demo.kill()
    output = "".join(seen) + rest
    assert demo.returncode == 130, output + errors
    assert "Interrupted: the service has stopped and its database is gone." in output
    assert "Traceback" not in errors
    assert "Unclosed" not in errors
    folder = re.search(r"SQLite +(\S+)/demo\.db", output)
    assert folder is not None, output
    assert not Path(folder.group(1)).exists()
