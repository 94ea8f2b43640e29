"""The temporary Prefect server of ``mascprocess``, started before the slow imports so that it boots meanwhile.

Without an API URL, Prefect starts a temporary server (its ephemeral mode) when
the flow is first called: it imports its server module in the calling process
(about 3 s here), starts ``uvicorn`` on its application factory and waits
until the server answers (7 s with an existing database on the benchmark's
machine, 13-17 s on a fresh one), and only then runs the flow. None of that
overlaps with anything.

:class:`TemporaryServer` starts the same server with the same command and
environment as Prefect does, first thing when the environment names no API
URL (and stops it if Prefect's settings, read next, name one after all);
``mascprocess`` then imports Prefect, the flow and the science modules while
the server boots, waits for it to answer, and runs the flow against its URL
(``prefect.settings.temporary_settings``), as against any server. The server
runs in a session (and process group) of its own, unlike Prefect's: a signal
to the terminal's process group (Ctrl-C, ``timeout``) reaches ``mascprocess``
only, which records the interruption through the server and then stops it.
It is stopped when the block ends, however it ends, and on Linux also goes
when ``mascprocess`` is killed outright (``kill -9``, the out-of-memory
killer), which Prefect's own does not.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: The exit code of uvicorn when it cannot start, as when its port was taken between choosing it and binding it
#: (then another is chosen, as Prefect does).
_PORT_TAKEN = 3

#: ``python -m uvicorn`` that ends with the process that started it (Linux): SIGTERM when that thread exits,
#: also after a SIGKILL, which no handler in ``mascprocess`` sees (Prefect's own server then lives on).
_LAUNCH = """\
import ctypes, os, runpy, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # the parent went before the line above
    sys.exit(0)
import atexit, gc
gc.disable()
sys.path.insert(0, sys.argv[sys.argv.index("--app-dir") + 1])  # as uvicorn will: not the working directory's
import prefect.server.api.server as _server
_create_app = _server.create_app
def _app(*args, **kwargs):
    _server.create_app = _create_app  # only uvicorn's call (Prefect's server-side clients call it again)
    app = _create_app(*args, **kwargs)
    gc.freeze()
    gc.enable()
    return app
_server.create_app = _app
atexit.register(gc.freeze)
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""
#: In that server's process the garbage collector is off while Prefect's server loads, which then goes to the
#: permanent generation, as in ``mascprocess`` itself (:mod:`mascara._collector`), and once more at exit: the
#: server boots sooner, its collections during the night do not walk what it loaded, and ``mascprocess``
#: does not wait for a collection over its whole heap when it stops it.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def drain_prefect_queues(timeout: float = 5.0) -> None:
    """Send the logs and events Prefect still holds (it sends them in the background every few seconds).

    Prefect's own temporary server stops at interpreter exit, after its queues
    were sent; this one stops earlier, so the queues are sent first. At most
    ``timeout`` s for each; a failure here loses only those messages.
    """
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
        EventsWorker.drain_all(timeout=timeout)
    except Exception:  # noqa: BLE001 - never fail the command for its last log lines
        logging.getLogger(__name__).debug("sending Prefect's last logs and events failed", exc_info=True)


def health(api_url: str, timeout: float) -> int | BaseException:
    """The HTTP status of the health check of the Prefect API at ``api_url`` (any answer, an error one
    included), or the transport error that kept the server from answering (refused, unreachable, timed out,
    hung up). The standard library's client: httpx builds a TLS context (about 50 ms) even for ``http://``."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as answer:
        answer.close()
        return answer.code
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        reason = getattr(exc, "reason", None) if isinstance(exc, urllib.error.URLError) else None
        return reason if isinstance(reason, BaseException) else exc


def configured_api_url() -> str | None:
    """The API URL Prefect's settings give (environment, profile, ``prefect.toml``, ``.env``), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def ephemeral_allowed() -> bool:
    """Whether Prefect's settings allow a temporary server (``PREFECT_SERVER_EPHEMERAL_ENABLED``).

    Prefect's shipped ``ephemeral`` profile turns it on; without it, and
    without an API URL, Prefect refuses to run a flow with a clear error, and
    so does ``mascprocess``.
    """
    from prefect.settings import get_current_settings

    return bool(get_current_settings().server.ephemeral.enabled)


class TemporaryServer:
    """A Prefect API server for one command, started at once and waited for later (:meth:`wait`).

    The command and environment are those of Prefect's ephemeral mode
    (``prefect.server.api.server.SubprocessASGIServer``): ``uvicorn`` on
    ``prefect.server.api.server:create_app`` with the UI off and the server
    marked ephemeral, so it runs the same services on the same database
    (``PREFECT_HOME``) as the server Prefect would have started.
    """

    def __init__(self) -> None:
        import importlib.util

        # where prefect is, without importing it (that takes 1.5-2 s, which the server's boot now covers)
        self._app_dir = str(Path(importlib.util.find_spec("prefect").origin).resolve().parent.parent)
        # The server reads the same profile, prefect.toml and .env as this process would (same environment,
        # PREFECT_HOME and working directory); Prefect passes its settings in the environment as well.
        self._env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1"}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _start(self) -> None:
        self.port = _free_port()
        args = ["--app-dir", self._app_dir, "--factory", "prefect.server.api.server:create_app", "--host",
                "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-c", _LAUNCH, str(os.getpid()), *args]
        else:
            cmd = [sys.executable, "-m", "uvicorn", *args]
        # its own session: a signal to the terminal's process group (Ctrl-C, `timeout`) reaches mascprocess only,
        # which records the interruption through this server and then stops it; in the same group the server
        # died first and the flow crashed on a refused connection (exit 1 after a minute, not 130)
        self.proc = subprocess.Popen(cmd, env=self._env, start_new_session=True)

    def wait(self, timeout: float) -> None:
        """Return once the server answers its health check; RuntimeError after ``timeout`` s or if it exits."""
        t0 = time.monotonic()
        retries = 0
        while True:
            code = self.proc.poll()
            if code == _PORT_TAKEN and retries < 3 and not _bindable(self.port):  # taken meanwhile, not a failure
                retries += 1
                self._start()
                continue
            if code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {code} before it answered")
            if health(self.api_url, timeout=2) == 200:
                return
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None  # only once reaped: a stop interrupted by a signal is done again by the caller's finally


@contextmanager
def early_server() -> Iterator[TemporaryServer | None]:
    """A :class:`TemporaryServer` when Prefect's settings give no API URL, else None; stopped on leaving.

    Without ``PREFECT_API_URL`` in the environment the server is started
    first, then Prefect's settings are read (importing Prefect): if they name
    an API URL after all (a profile, ``prefect.toml``) or do not allow a
    temporary server, it is stopped before it has done more than import, and
    None is given. Before the server stops, Prefect's queued logs and events
    are sent to it (:func:`drain_prefect_queues`).
    """
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    server = TemporaryServer()
    try:
        if configured_api_url() or not ephemeral_allowed():
            server.stop()
            yield None
        else:
            try:
                yield server
            finally:
                drain_prefect_queues()
    finally:
        server.stop()
