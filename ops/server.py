"""Start, wait for, drain, stop and query a local TorchServe serving KOA-Serve's archive.

``python -m ops.server start|stop|restart|token|renew|status [--workdir logs/serve]`` (``make serve``,
``make stop``, ``make restart``, ``make token``, ``make renew-token``)

Each server instance lives in its own working directory: TorchServe writes its key file
(``key_file.json``), logs and pid file (via TMPDIR) there, so a test server on free ports and
``make serve`` never step on each other. `start` returns only when the model answers, or fails
with the reason from the logs; `stop` returns only when Java and every worker are gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# The drain handshake's file names live with the handler; importing handler.drain pulls in nothing else.
from handler.drain import BUSY_PREFIX, DRAIN_FILE, STATE_ENV
from ops.procs import descendants, free_ports, is_alive, read_pid

__all__ = [
    "Server", "ServeError", "start", "start_on_free_ports", "serving", "attach", "stop", "drain", "restart",
    "token", "read_keys", "renew_key", "is_running", "server_pid", "workdir_config", "parse_properties",
    "render_config", "models_property", "with_batching", "free_ports", "is_alive", "descendants", "describe", "renew",
    "DEFAULT_WORKDIR", "DRAIN_S", "LOG_CONFIG", "MODEL_NAME",
]  # fmt: skip

from model.paths import ROOT

DEFAULT_WORKDIR = ROOT / "logs" / "serve"
# Frontend logging without the per-request DEBUG lines of the built-in config (see the file).
LOG_CONFIG = ROOT / "log4j2.xml"
MODEL_NAME = "oamen"
PORT_KEYS = {
    "inference": ("inference_address", "http://127.0.0.1:{}"),
    "management": ("management_address", "http://127.0.0.1:{}"),
    "metrics": ("metrics_address", "http://127.0.0.1:{}"),
    "grpc_inference": ("grpc_inference_port", "{}"),
    "grpc_management": ("grpc_management_port", "{}"),
}


DRAIN_S = 30.0
DRAIN_FLUSH_S = 0.1


class ServeError(RuntimeError):
    """TorchServe did not come up (or go down) as asked; the message carries the log's reason."""


@dataclass
class Server:
    workdir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    grpc_port: int

    def keys(self) -> dict[str, str]:
        return read_keys(self.workdir)


def parse_properties(text: str) -> dict[str, str]:
    """The ``key=value`` lines of a TorchServe ``config.properties`` text (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def render_config(
    src: Path, dst: Path, ports: dict[str, int] | None = None, extra: dict[str, str] | None = None
) -> Path:
    """Copy ``src`` to ``dst`` with other ports (keys of PORT_KEYS) and extra properties."""
    text = src.read_text()
    for name, port in (ports or {}).items():
        key, fmt = PORT_KEYS[name]
        text, n = re.subn(rf"^{key}=.*$", f"{key}={fmt.format(port)}", text, flags=re.M)
        if n != 1:
            raise ValueError(f"{src} has no single {key} line")
    for key, value in (extra or {}).items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        if n == 0:
            text += f"\n{key}={value}\n"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return dst


def models_property(config_text: str) -> dict:
    """The ``models=`` property of a config, parsed: ``{name: {version: settings}}``."""
    line = next((ln for ln in config_text.splitlines() if ln.startswith("models=")), None)
    if line is None:
        raise ValueError("config has no models= line")
    return json.loads(line.split("=", 1)[1])


def with_batching(
    config_text: str, batch_size: int | None = None, max_batch_delay: int | None = None, workers: int | None = None
) -> str:
    """The ``models`` property of a config with another batch size, batch delay and/or worker count."""
    models = models_property(config_text)
    for versions in models.values():
        for cfg in versions.values():
            if batch_size is not None:
                cfg["batchSize"] = batch_size
            if max_batch_delay is not None:
                cfg["maxBatchDelay"] = max_batch_delay
            if workers is not None:
                cfg["minWorkers"] = cfg["maxWorkers"] = workers
    return json.dumps(models)


def start_on_free_ports(
    model_store: Path,
    workdir: Path,
    config: Path = ROOT / "config.properties",
    batch_size: int | None = None,
    max_batch_delay: int | None = None,
    timeout: float = 240.0,
    workers: int | None = None,
    properties: dict[str, str] | None = None,
    log_config: Path = LOG_CONFIG,
    keys: Callable[[Path], dict[str, str]] | None = None,
) -> Server:
    """A private server (tests, benchmarks): ``config`` on free ports, optionally other batching, workers,
    ``properties`` (e.g. ``vmargs``) or log4j2 configuration."""
    *ports, worker_port = free_ports(len(PORT_KEYS) + 1)
    # Workers talk to the frontend over /tmp/.ts.sock.<port>; a private port keeps this server's
    # workers apart from any other TorchServe on the machine (e.g. `make serve`).
    extra = {"initial_worker_port": str(worker_port), **(properties or {})}
    if batch_size is not None or max_batch_delay is not None or workers is not None:
        extra["models"] = with_batching(Path(config).read_text(), batch_size, max_batch_delay, workers)
    rendered = render_config(Path(config), Path(workdir) / "config.properties", dict(zip(PORT_KEYS, ports)), extra)
    return start(model_store, rendered, workdir, timeout=timeout, log_config=log_config, keys=keys)


def read_keys(workdir: Path) -> dict[str, str]:
    """{'inference': key, 'management': key, 'api': key} from the server's key_file.json."""
    path = Path(workdir) / "key_file.json"
    if not path.is_file():
        raise ServeError(f"{path} not found: is TorchServe running from {workdir}? (`make serve`)")
    data = json.loads(path.read_text())
    return {"inference": data["inference"]["key"], "management": data["management"]["key"], "api": data["API"]["key"]}


def is_running(workdir: Path) -> bool:
    """Whether a TorchServe started from ``workdir`` is alive (its pid file, as ``status`` reports it)."""
    pid = server_pid(Path(workdir).resolve())
    return pid is not None and is_alive(pid)


def workdir_config(workdir: Path) -> dict[str, str]:
    """The properties of the server started from ``workdir``: a private server (`start_on_free_ports`)
    keeps its rendered config there; ``make serve`` uses the repository's ``config.properties``."""
    rendered = Path(workdir) / "config.properties"
    return parse_properties((rendered if rendered.is_file() else ROOT / "config.properties").read_text())


def attach(workdir: Path) -> Server:
    """The server running from ``workdir``.

    Raises:
        ServeError: none is running there.
    """
    workdir = Path(workdir).resolve()
    if not is_running(workdir):
        raise ServeError(f"no TorchServe is running from {workdir} (`make serve`, or leave --workdir out)")
    props = workdir_config(workdir)
    return Server(
        workdir,
        props["inference_address"],
        props["management_address"],
        props["metrics_address"],
        int(props.get("grpc_inference_port", 7070)),
    )


@contextlib.contextmanager
def serving(
    store: Path, workdir: Path | None = None, properties: dict[str, str] | None = None
) -> Iterator[Server]:
    """A private server on free ports (with extra config ``properties``), always stopped afterwards; or the one
    running from ``workdir``."""
    if workdir is not None:
        yield attach(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="koa-fault-") as tmp:
        try:
            yield start_on_free_ports(store, Path(tmp), properties=properties)
        finally:
            stop(Path(tmp))


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(TMPDIR=str(tmp), LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"))
    env[STATE_ENV] = str(workdir / "state")  # the drain handshake with the handler (handler/drain.py)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def server_pid(workdir: Path) -> int | None:
    """The process id of the Java frontend started from ``workdir`` (its pid file), or None."""
    return read_pid(Path(workdir) / "tmp" / ".model_server.pid")


def _log_lines(workdir: Path) -> list[str]:
    texts = []
    for name in ("model_log.log", "ts_log.log"):
        p = workdir / "logs" / name
        if p.is_file():
            texts += p.read_text(errors="replace").splitlines()
    return texts


def _log_reason(workdir: Path, lines: int = 8) -> str:
    """The most telling lines of the server's logs: exceptions first, then errors, else the tail."""
    texts = _log_lines(workdir)
    for pattern in (r"\b\w+(Error|Exception)\b:", r"ERROR|Error|Exception|failed"):
        picked = list(dict.fromkeys(t for t in texts if re.search(pattern, t)))
        if picked:
            return "\n".join(picked[-lines:])
    return "\n".join(texts[-lines:]) if texts else f"(no logs in {workdir / 'logs'})"


def _worker_deaths(workdir: Path) -> int:
    return sum("Backend worker process died" in t for t in _log_lines(workdir))


def _get(url: str, key: str | None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start(
    model_store: Path,
    config: Path,
    workdir: Path = DEFAULT_WORKDIR,
    models: str = f"{MODEL_NAME}={MODEL_NAME}.mar",
    timeout: float = 180.0,
    log_config: Path = LOG_CONFIG,
    keys: Callable[[Path], dict[str, str]] | None = None,
) -> Server:
    """Start TorchServe in the background and wait until every worker of the model is READY.

    ``keys`` reads the keys the start-up poll sends to the management API (default `read_keys`, the
    key_file.json TorchServe writes; a server without token authorization writes none).
    """
    keys = keys or read_keys
    workdir = Path(workdir).resolve()
    if server_pid(workdir) and is_alive(server_pid(workdir)):
        raise ServeError(
            f"a TorchServe from {workdir} is already running (pid {server_pid(workdir)}); `make stop` first"
        )
    if shutil.which("java") is None:
        raise ServeError("Java 17+ is required by TorchServe: sudo apt-get install -y openjdk-17-jre-headless")
    mar = Path(model_store) / models.split("=", 1)[1]
    if not mar.is_file():
        raise ServeError(f"{mar} is missing: run `make archive` first")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "key_file.json").unlink(missing_ok=True)  # a stale key file would look like a started server
    shutil.rmtree(workdir / "logs", ignore_errors=True)
    shutil.rmtree(workdir / "state", ignore_errors=True)  # a drain left over from the last stop
    (workdir / "state").mkdir()
    props = parse_properties(Path(config).read_text())
    metrics_config = props.get("metrics_config")
    if metrics_config and not Path(metrics_config).is_absolute():
        # TorchServe reads it from its working directory (``workdir``): the repository's file, by absolute path
        extra = {"metrics_config": str(ROOT / metrics_config)}
        config = render_config(Path(config), workdir / "config.properties", extra=extra)
    cmd = [
        str(Path(sys.executable).parent / "torchserve"),
        "--start",
        "--ncs",
        "--model-store", str(Path(model_store).resolve()),
        "--models", models,
        "--ts-config", str(Path(config).resolve()),
        "--log-config", str(Path(log_config).resolve()),
    ]  # fmt: skip
    # Output goes to a file, not a pipe: Java inherits it and would keep a pipe open forever.
    console = workdir / "console.log"
    with open(console, "w") as sink:
        code = subprocess.run(
            cmd,
            cwd=workdir,
            env=_env(workdir),
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=60,
            start_new_session=True,
        ).returncode
    if code != 0:
        raise ServeError(f"torchserve --start failed ({code}): {console.read_text(errors='replace').strip()[-2000:]}")
    server = Server(
        workdir,
        props["inference_address"],
        props["management_address"],
        props["metrics_address"],
        int(props.get("grpc_inference_port", 7070)),
    )
    name = models.split("=", 1)[0]
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        pid = server_pid(workdir)
        if pid is not None and not is_alive(pid):
            raise ServeError(f"TorchServe exited during start-up. Log:\n{_log_reason(workdir)}")
        if _worker_deaths(workdir) >= 2:  # TorchServe would restart it forever; the reason will not change
            reason = _log_reason(workdir)
            stop(workdir)
            raise ServeError(f"model {name!r} failed to load (its worker keeps dying). Log:\n{reason}")
        try:
            status, body = _get(f"{server.management_url}/models/{name}", keys(workdir)["management"])
            if status == 200:
                workers = json.loads(body)[0].get("workers", [])
                if workers and all(w.get("status") == "READY" for w in workers):
                    return server
                last = f"workers: {[w.get('status') for w in workers]}"
        except (ServeError, OSError, ValueError, KeyError) as exc:
            last = str(exc)
        time.sleep(0.5)
    reason = _log_reason(workdir)
    stop(workdir)
    raise ServeError(f"model {name!r} did not become READY within {timeout:.0f} s ({last}). Log:\n{reason}")


def _busy_workers(state: Path) -> list[int]:
    """Pids of the live workers that hold a ``busy`` file (a killed worker's file is ignored)."""
    pids = []
    for path in state.glob(f"{BUSY_PREFIX}*"):
        suffix = path.name[len(BUSY_PREFIX) :]
        if suffix.isdigit() and int(suffix) > 0 and is_alive(int(suffix)):
            pids.append(int(suffix))
    return pids


def drain(workdir: Path, timeout: float = DRAIN_S) -> float:
    """Answer new work with 503 ``restarting`` and wait until the batches being graded are answered.

    The server side of handler/drain.py. Returns the seconds it waited; gives up after ``timeout``
    (an explanation with Integrated Gradients can take that long on a busy CPU).
    """
    state = Path(workdir) / "state"
    if not state.is_dir():  # a server started some other way: nothing to drain with
        return 0.0
    t0 = time.monotonic()
    (state / DRAIN_FILE).touch()
    while time.monotonic() - t0 < timeout and _busy_workers(state):
        time.sleep(0.02)
    time.sleep(DRAIN_FLUSH_S)  # Java writes the last answers to their sockets
    return time.monotonic() - t0


def stop(workdir: Path = DEFAULT_WORKDIR, timeout: float = 60.0, drain_s: float = DRAIN_S) -> bool:
    """Stop the server started from ``workdir``; wait until Java and its workers are gone.

    First drains (see `drain`; ``drain_s`` 0 skips it): the requests being graded are answered,
    later ones get 503 ``restarting``. Returns False when nothing was running.
    """
    workdir = Path(workdir).resolve()
    pid = server_pid(workdir)
    if pid is None or not is_alive(pid):
        return False
    if drain_s > 0:
        drain(workdir, drain_s)
    pids = [pid, *descendants(pid)]
    subprocess.run(
        [str(Path(sys.executable).parent / "torchserve"), "--stop"],
        cwd=workdir,
        env=_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:  # still there after the timeout: make sure nothing is left running
        if is_alive(p):
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
    return True


def renew_key(workdir: Path, management_url: str, kind: str = "inference") -> str:
    """Ask the server for a new ``kind`` key (TorchServe's token API, authorised by the API key)."""
    keys = read_keys(workdir)
    req = urllib.request.Request(
        f"{management_url}/token?type={kind}", method="POST", headers={"Authorization": f"Bearer {keys['api']}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        if resp.status != 200:
            raise ServeError(f"token renewal answered {resp.status}")
    new = read_keys(workdir)[kind]
    if new == keys[kind]:
        raise ServeError("the server answered but key_file.json still holds the old key")
    return new


def token(workdir: Path = DEFAULT_WORKDIR) -> str:
    """The inference key of the server running from ``workdir`` (what ``make token`` prints)."""
    return read_keys(workdir)["inference"]


def restart(
    model_store: Path,
    config: Path,
    workdir: Path = DEFAULT_WORKDIR,
    timeout: float = 180.0,
    drain_s: float = DRAIN_S,
) -> tuple[bool, Server]:
    """Stop (after a drain) whatever runs from ``workdir``, then start again; clients re-read the new keys.

    Returns whether a server was running, and the new one.
    """
    was_running = stop(workdir, drain_s=drain_s)
    return was_running, start(model_store, config, workdir, timeout=timeout)


def describe(s: Server) -> str:
    """What `start` prints: where the server answers, and how to get its key."""
    return "\n".join([
        f"TorchServe is serving {MODEL_NAME} (logs: {s.workdir / 'logs'})",
        f"  REST inference   {s.inference_url}/predictions/{MODEL_NAME}",
        f"  REST explain     {s.inference_url}/explanations/{MODEL_NAME}",
        f"  gRPC inference   127.0.0.1:{s.grpc_port}",
        f"  management       {s.management_url}   metrics {s.metrics_url}/metrics",
        "  token            `make token` (keys expire after 60 min; see docs/OPERATIONS.md, Tokens)",
    ])  # fmt: skip


def renew(workdir: Path, config: Path) -> str:
    """`renew_key` for the server in ``workdir``, its management address read from the config it runs with."""
    rendered = workdir / "config.properties"  # a private server keeps its own config there
    props = parse_properties((rendered if rendered.is_file() else config).read_text())
    return renew_key(workdir, props["management_address"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("start", "stop", "restart", "token", "renew", "status"))
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    try:
        if args.command == "restart":
            t0 = time.monotonic()
            was_running, s = restart(args.model_store, args.config, args.workdir, timeout=args.timeout)
            print("stopped" if was_running else "was not running", f"and started ({time.monotonic() - t0:.1f} s)")
            print(describe(s))
        elif args.command == "start":
            print(describe(start(args.model_store, args.config, args.workdir, timeout=args.timeout)))
        elif args.command == "stop":
            print("stopped" if stop(args.workdir) else "not running")
        elif args.command == "token":
            print(token(args.workdir))
        elif args.command == "renew":
            print(renew(args.workdir, args.config))
        else:
            running = is_running(args.workdir)
            print(f"running (pid {server_pid(args.workdir.resolve())})" if running else "not running")
            return 0 if running else 1
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
