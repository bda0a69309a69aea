"""Shared test fixtures: a real S3-protocol server (moto in server mode, over HTTP), buckets,
storage options, a fault-injecting proxy in front of it, and procedurally drawn test images.

Environment set for the whole test session by ``s3_server`` (Ray workers started later by a test
inherit it, so they reach the same server with no extra configuration):

- ``AWS_ACCESS_KEY_ID=testing``, ``AWS_SECRET_ACCESS_KEY=testing`` (dummy; moto accepts anything)
- ``AWS_DEFAULT_REGION=us-east-1``, ``AWS_REGION=us-east-1``
- ``AWS_ENDPOINT_URL=<the moto endpoint>`` (so nothing in a test can reach real AWS)
- ``AWS_EC2_METADATA_DISABLED=true`` (no slow instance-metadata credential lookups)
- ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE`` pointing at empty files (a developer's
  ``~/.aws`` cannot leak in); ``AWS_PROFILE`` removed.

Ray: ``ray_local`` gives a module the session's one shared local Ray (:class:`SharedRay`);
tests that must own a Ray (a subprocess driver, ``RayHead``) start their own.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import signal
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

import torchvision_cpu  # noqa: F401  (first: transformers must see the oracles' torchvision)

from step1x_batch.io.storage import StorageOptions
from step1x_batch.job.lease import LEASE_KEY

_ROOT = Path(__file__).resolve().parents[1]

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request access lines
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _S3_ENV.items():
            mp.setenv(name, value)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on ``endpoint``; returns ``s3://name``."""
    import boto3

    name = name or f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_server) -> Iterator[str]:
    """A fresh, empty bucket for one test; yields ``s3://<name>``."""
    yield make_bucket(s3_server)


@pytest.fixture
def storage_options(s3_server) -> StorageOptions:
    """Options naming the moto endpoint explicitly (the environment names it too)."""
    return StorageOptions(endpoint_url=s3_server, max_attempts=4)


# --- fault injection -----------------------------------------------------------------------------


class FlakyProxy:
    """An HTTP proxy in front of the S3 server that fails chosen requests the way object stores
    do, to exercise retries over a real connection.

    ``fail(n, kind)`` makes the next ``n`` matching requests fail with ``kind``:
    ``"503"`` (503 SlowDown), ``"500"`` (500 InternalError), ``"reset"`` (connection closed with
    no response) or ``"truncate"`` (status and headers sent, then half the body, then closed).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self._plan: list[tuple[str, str | None, str | None]] = []
        self._lock = threading.Lock()
        self.injected = 0
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = io.BytesIO()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out.getvalue()
                        out.write(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                kind = proxy._take(self.command, self.path)
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                if kind in ("503", "500"):
                    code = "SlowDown" if kind == "503" else "InternalError"
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected {kind}</Message></Error>"
                    ).encode()
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if kind == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("transfer-encoding", "content-length", "connection")
                }
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    if kind == "truncate" and len(data) > 1:
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, n: int, kind: str = "503", method: str | None = None, path: str | None = None) -> None:
        """Fail the next ``n`` requests (only those with HTTP ``method``, and whose path holds
        ``path``, when given)."""
        assert kind in ("503", "500", "reset", "truncate"), kind
        with self._lock:
            self._plan.extend([(kind, method, path)] * n)

    def _take(self, method: str, path: str) -> str | None:
        with self._lock:
            for i, (kind, want, part) in enumerate(self._plan):
                if (want is None or want == method) and (part is None or part in path):
                    del self._plan[i]
                    self.injected += 1
                    return kind
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def flaky_s3(s3_server) -> Iterator[FlakyProxy]:
    """A fault-injecting proxy in front of the moto server (see :class:`FlakyProxy`)."""
    proxy = FlakyProxy(s3_server)
    try:
        yield proxy
    finally:
        proxy.close()


# --- procedural images ---------------------------------------------------------------------------


def draw_rgb(width: int = 48, height: int = 32) -> np.ndarray:
    """A deterministic RGB uint8 test picture with four distinct solid corners:
    top-left red, top-right green, bottom-left blue, bottom-right white (rest a gradient)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack(
        [(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), (x + y) % 256], axis=-1
    ).astype(np.uint8)
    qh, qw = height // 4, width // 4
    img[:qh, :qw] = (255, 0, 0)
    img[:qh, -qw:] = (0, 255, 0)
    img[-qh:, :qw] = (0, 0, 255)
    img[-qh:, -qw:] = (255, 255, 255)
    return img


class ImageFactory:
    """Draws small procedural test images and encodes them in many modes and formats."""

    def rgb(self, width: int = 48, height: int = 32) -> np.ndarray:
        return draw_rgb(width, height)

    def encode(self, image: Image.Image | np.ndarray, fmt: str = "PNG", **save_kwargs) -> bytes:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        buf = io.BytesIO()
        image.save(buf, format=fmt, **save_kwargs)
        return buf.getvalue()

    def pil(self, mode: str = "RGB", width: int = 48, height: int = 32) -> Image.Image:
        """The test picture converted to a Pillow ``mode`` (RGBA gets a transparent left half)."""
        base = Image.fromarray(draw_rgb(width, height))
        if mode == "RGBA":
            im = base.convert("RGBA")
            alpha = np.full((height, width), 255, np.uint8)
            alpha[:, : width // 2] = 0
            im.putalpha(Image.fromarray(alpha))
            return im
        return base.convert(mode)

    def bytes(self, mode: str = "RGB", fmt: str = "PNG", width: int = 48, height: int = 32,
              **save_kwargs) -> bytes:
        return self.encode(self.pil(mode, width, height), fmt, **save_kwargs)

    def exif_rotated(self, orientation: int = 6, width: int = 48, height: int = 32) -> bytes:
        """A JPEG whose stored pixels are the test picture rotated so that applying EXIF
        ``orientation`` makes it upright again (6: stored rotated 90 degrees counter-clockwise)."""
        upright = Image.fromarray(draw_rgb(width, height))
        inverse = {
            2: Image.Transpose.FLIP_LEFT_RIGHT,
            3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_90,
            7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270,
        }[orientation]
        stored = upright.transpose(inverse)
        exif = Image.Exif()
        exif[0x0112] = orientation
        return self.encode(stored, "JPEG", quality=95, exif=exif.tobytes())

    def animated_gif(self, frames: int = 3, width: int = 48, height: int = 32) -> bytes:
        """An animated GIF whose first frame is the test picture and later frames solid dark
        greys (all different, so the encoder keeps every frame)."""
        first = Image.fromarray(draw_rgb(width, height)).convert("P", palette=Image.Palette.ADAPTIVE)
        rest = [Image.new("RGB", (width, height), (8 * i,) * 3) for i in range(frames - 1)]
        buf = io.BytesIO()
        first.save(buf, format="GIF", save_all=True, append_images=rest, duration=100, loop=0)
        return buf.getvalue()

    def bomb_png(self, width: int = 20000, height: int = 20000) -> bytes:
        """A valid, tiny (tens of KB) 1-bit black PNG of ``width`` x ``height`` pixels: a
        decompression bomb (400 megapixels by default)."""
        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

        row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
        z = zlib.compressobj(9)
        idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
        ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def image_factory() -> ImageFactory:
    return ImageFactory()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests that must name one up front)."""
    with socketserver.TCPServer(("127.0.0.1", 0), None) as s:  # type: ignore[arg-type]
        return s.server_address[1]


__all__ = ["FlakyProxy", "ImageFactory", "SharedRay", "draw_rgb", "expire_local_lease", "make_bucket", "free_port"]


_RAY_INIT = {
    "address": "local",  # a private Ray, never a cluster another test (or a person) started
    "num_cpus": 2,  # like the CI machine
    "include_dashboard": False,
    "log_to_driver": False,
    # workers import the package and tests/ plug-ins (``job_plugins:...``) by name
    "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join([str(_ROOT), str(_ROOT / "tests")])}},
}


class SharedRay:
    """The one local Ray this test session shares: started on first use, restarted only when a
    test shut it down (or left another Ray in its place), stopped at the end of the session.
    Starting Ray costs seconds, and a dozen modules each started their own."""

    def __init__(self) -> None:
        self.gcs_address: str | None = None

    def ensure(self) -> None:
        """Make this session's Ray the one this process is connected to."""
        import ray

        if ray.is_initialized():
            if ray.get_runtime_context().gcs_address == self.gcs_address:
                return
            ray.shutdown()  # another Ray (a job's own): not the shared one
        ray.init(**_RAY_INIT)
        self.gcs_address = ray.get_runtime_context().gcs_address

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.gcs_address = None


_SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def shared_ray(s3_server) -> Iterator[SharedRay]:
    """The session's :class:`SharedRay`; its workers inherit the moto environment."""
    try:
        yield _SHARED_RAY
    finally:
        _SHARED_RAY.stop()


@pytest.fixture(scope="module")
def ray_local(shared_ray: SharedRay) -> Iterator[None]:
    """A local Ray for this module's tests (2 CPUs, like the CI machine): the session's shared one
    (see :class:`SharedRay`), so a module starts none of its own. Workers inherit the moto
    environment and import the package and tests/ plug-ins (``job_plugins:...``) by name."""
    shared_ray.ensure()
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """Before each test that uses ``ray_local``, once its fixtures are set up: the shared Ray
    again if an earlier test of its module shut it down."""
    result = yield
    if "ray_local" in getattr(item, "fixturenames", ()):
        _SHARED_RAY.ensure()
    return result


def expire_local_lease(output_dir: Path | str) -> None:
    """Age a killed driver's lease on a local output root past its ttl, as waiting the ttl out
    would (its mtime is its last renewal, and the killed driver renews it no more): the re-run
    takes it over now, not after a fixed sleep. The ttl is the lease's own (``ttl_s``)."""
    lease = Path(output_dir) / LEASE_KEY
    ttl_s = float(json.loads(lease.read_bytes())["ttl_s"])
    renewed = time.time() - ttl_s - 1.0
    os.utime(lease, (renewed, renewed))


def marked_pids(marker: str) -> list[int]:
    """The processes (other than this one) with ``marker`` in their environment: a job started
    as a subprocess, and the Ray it started."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            pids.append(int(name))
    return pids


def kill_marked(marker: str) -> None:
    """SIGKILL whatever is left running with ``marker`` in its environment (a killed driver's Ray)."""
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process, read from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text(errors="replace")
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int) -> dict[int, int]:
    """The processes under ``pid`` now: pid -> start time (so a reused pid is not mistaken)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(child)
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def still_running(processes: dict[int, int]) -> dict[int, int]:
    """Those of ``processes`` (pid -> start time) still running (zombies count as gone)."""
    left = {}
    for pid, start in processes.items():
        try:
            text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if int(fields[19]) == start and fields[0] != "Z":
            left[pid] = start
    return left


def kill_processes(processes: dict[int, int]) -> None:
    """SIGKILL those of ``processes`` still running (a failed test's leftovers)."""
    for pid in still_running(processes):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RayHead:
    """``ray start --head --block`` in its own session, temp dir and free ports, so that no other
    test's Ray (nor a person's) can join it by accident; :meth:`stop` ends only what it started:
    its process group, then every process it had under it."""

    def __init__(self, env: dict[str, str], temp: str, *, dashboard: bool = True) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        self.temp, self.env = temp, env
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        cmd = [ray, "start", "--head", "--block", f"--temp-dir={temp}", "--num-cpus=2", "--num-gpus=0",
               f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
               "--disable-usage-stats"]
        cmd += [f"{k}={v}" for k, v in ports.items()]
        os.makedirs(temp, exist_ok=True)
        self.log_path = os.path.join(temp, "head.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self._seen: dict[int, int] = {}
        deadline = time.time() + 120
        while True:
            self._seen.update(descendants(self.proc.pid))
            if dashboard:
                try:
                    with urllib.request.urlopen(f"{self.url}/api/version", timeout=2) as r:
                        if r.status == 200:
                            break
                except urllib.error.HTTPError as e:
                    if e.code == 401:  # token authentication: the server is up
                        break
                except OSError:
                    pass
            elif "Ray runtime started" in Path(self.log_path).read_text(errors="replace"):
                break
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"ray head did not come up:\n{Path(self.log_path).read_text()[-3000:]}")
            time.sleep(0.5)
        self._seen.update(descendants(self.proc.pid))

    def stop(self) -> None:
        """SIGKILL at once: ``ray start --block`` ignores SIGTERM (a polite stop only waited out a
        timeout), and every process it started is this test's to end."""
        self._seen.update(descendants(self.proc.pid))
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 20
        while still_running(self._seen) and time.time() < deadline:
            kill_processes(self._seen)
            time.sleep(0.2)
        self._log.close()
