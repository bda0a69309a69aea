"""Judging edits (issue 20): the HTTP judge's request concurrency and the measure stage's CPU cost.

    python benchmarks/bench_judge.py                 # both parts, the defaults (~1 minute on 2 cores)
    python benchmarks/bench_judge.py http --rows 16 64 --latency 0.2 --repeat 2
    python benchmarks/bench_judge.py metrics --sizes 512 1024 --repeat 3 --threads 1

**http**: Ray 2.60's own ``HttpRequestUDF.udf`` (``ray.data.llm``'s HTTP stage), driven in this
process without a cluster, posts one batch of N rows to a local OpenAI-compatible server that
answers every request after a fixed latency (``--latency``; it runs in a subprocess, an aiohttp
server, so its work never shares this process's GIL). Two session factories, alternated in one run:

- (a) Ray's default, ``aiohttp.ClientSession``: its ``post()`` starts a request only when awaited,
  and the UDF awaits them one after another, so a batch should cost N x latency;
- (b) ``step1x_batch.judge.http.TolerantSession`` (what ``engine: http`` uses): ``post()`` starts the
  request at once, so a batch should cost about 1 x latency (aiohttp's connector allows 100
  connections per session, so N > 100 takes ceil(N / 100) x latency).

Each row's payload is what ``judge/stage.py``'s ``_Ask`` builds for the SC question of a row with
one input and one edit, both ~``--image-size``^2 PNGs (``chat_payload`` + ``wrapped_payload``,
the "step1x-batch" prompt set). The server counts requests, bytes and the peak number in flight.

**metrics**: ``judge.metrics.image_metrics`` per row at each ``--sizes`` (a smoothed-noise "photo"
and an edit of it: a changed rectangle plus +-3 levels of noise everywhere, like a VAE round trip),
and its pieces (``changed_fraction``, ``psnr``, ``ssim``), beside scikit-image's
``structural_similarity`` with the same settings (Gaussian 1.5, population covariance; the values
must agree) and, for scale, decoding the two PNGs. ``--threads 1`` by default: a Ray task with a
fractional CPU (``judge.resources.io_cpus_per_task`` 0.25) gets ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANSWER = json.dumps({"score": [7, 8], "reasoning": "bench judge"})


# --- the server (a subprocess) ------------------------------------------------------------------


def serve(latency: float) -> None:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (ephemeral port, printed on stdout)
    that answers every POST after ``latency`` seconds; GET /stats gives its counters."""
    from aiohttp import web

    stats = {"requests": 0, "bytes": 0, "in_flight": 0, "peak_in_flight": 0}

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        stats["requests"] += 1
        stats["bytes"] += len(body)
        stats["in_flight"] += 1
        stats["peak_in_flight"] = max(stats["peak_in_flight"], stats["in_flight"])
        try:
            await asyncio.sleep(latency)
        finally:
            stats["in_flight"] -= 1
        return web.json_response({"id": "bench", "object": "chat.completion", "model": "bench",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": ANSWER}}]})

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(stats)

    async def reset(_: web.Request) -> web.Response:
        stats.update(requests=0, bytes=0, peak_in_flight=0)
        return web.json_response(stats)

    async def main() -> None:
        app = web.Application(client_max_size=256 * 2**20)  # aiohttp's default is 1 MiB: a row is ~2
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/stats", get_stats)
        app.router.add_post("/reset", reset)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Event().wait()  # until the parent kills us

    asyncio.run(main())


class Server:
    """The latency server in a subprocess, for a ``with`` block."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen([sys.executable, __file__, "_serve", "--latency", str(self.latency)],
                                     stdout=subprocess.PIPE, text=True)
        try:
            self.port = int(self.proc.stdout.readline())
        except ValueError:
            self.proc.kill()
            raise RuntimeError("the latency server did not start (see its error above)") from None
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def _call(self, method: str, path: str) -> dict:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(self.base + path, data=b"" if method == "POST" else None, method=method)
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        return self._call("GET", "/stats")

    def reset(self) -> None:
        self._call("POST", "/reset")


# --- images -------------------------------------------------------------------------------------


def photo(size: int, seed: int):
    """A photo-like HxWx3 uint8 image: smoothed noise at a few scales (bicubic up from coarse grids)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((4, 0.55), (16, 0.3), (64, 0.12), (size, 0.03)):
        grid = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        out += weight * np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def edited(image, seed: int):
    """``image`` with a rectangle (a ninth of the area) repainted and +-3 levels of noise everywhere."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = image.astype(np.int16) + rng.integers(-3, 4, image.shape, dtype=np.int16)
    h, w = image.shape[:2]
    out[h // 3: 2 * h // 3, w // 3: 2 * w // 3] = photo(image.shape[0], seed + 1)[h // 3: 2 * h // 3,
                                                                                   w // 3: 2 * w // 3]
    return np.clip(out, 0, 255).astype(np.uint8)


def png(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


# --- http ---------------------------------------------------------------------------------------


def ask_rows(n: int, image_size: int, url: str) -> tuple[list[dict], float]:
    """The SC question of ``n`` rows as ``_Ask`` (engine http) builds it, and its seconds per row."""
    from step1x_batch.judge.config import JudgeConfig
    from step1x_batch.judge.prompts import load_prompts
    from step1x_batch.judge.stage import _Ask

    judge = JudgeConfig(engine="http", model="Qwen2.5-VL-7B-Instruct", url=url)
    ask = _Ask(judge, load_prompts("step1x-batch"), "answer_sc", "http")
    first = photo(image_size, 0)
    inputs, edit = [png(first)], png(edited(first, 10))
    start = time.perf_counter()
    rows = [ask({"id": f"r{i}", "instruction": f"make the sky orange, row {i}", "input_bytes": inputs,
                 "output_bytes": edit, "against_bytes": None, "error_type": None})["payload"] for i in range(n)]
    return rows, (time.perf_counter() - start) / n


async def one_batch(payloads: list[dict], url: str, factory) -> tuple[float, list[dict]]:
    from ray.llm._internal.batch.stages.http_request_stage import HttpRequestUDF

    udf = HttpRequestUDF(data_column="__data", expected_input_keys=["payload"], url=url, max_retries=0,
                         session_factory=factory)
    rows = [{"payload": p, udf.IDX_IN_BATCH_COLUMN: i} for i, p in enumerate(payloads)]
    start = time.perf_counter()
    out = [o async for o in udf.udf(rows)]
    return time.perf_counter() - start, out


def http(args: argparse.Namespace) -> dict:
    from step1x_batch.judge.http import TolerantSession, answer_text

    factories = {"ray default (aiohttp.ClientSession)": None,
                 "TolerantSession": TolerantSession(120.0, None, retries=1)}
    results = {"latency_s": args.latency, "image_size": args.image_size, "repeat": args.repeat, "batches": []}
    with Server(args.latency) as server:
        url = server.base + "/v1/chat/completions"
        payloads, ask_s = ask_rows(max(args.rows), args.image_size, url)
        body_kib = len(json.dumps(payloads[0])) / 1024
        print(f"payload: SC question, two {args.image_size}^2 PNGs, {body_kib:.0f} KiB per request body; "
              f"_Ask builds one in {ask_s * 1e3:.1f} ms")
        print(f"server latency {args.latency * 1e3:.0f} ms per request; best of {args.repeat}, sessions alternated")
        results["request_kib"], results["ask_ms_per_row"] = round(body_kib, 1), round(ask_s * 1e3, 2)
        for n in args.rows:
            times: dict[str, list[float]] = {name: [] for name in factories}
            peaks: dict[str, int] = {}
            for _ in range(args.repeat):
                for name, factory in factories.items():
                    server.reset()
                    seconds, out = asyncio.run(one_batch(payloads[:n], url, factory))
                    stats = server.stats()
                    assert len(out) == n and stats["requests"] == n, (len(out), stats)
                    assert sorted(o["__idx_in_batch"] for o in out) == list(range(n))
                    assert all(answer_text(o["http_response"]) == ANSWER for o in out)
                    times[name].append(seconds)
                    peaks[name] = max(peaks.get(name, 0), stats["peak_in_flight"])
            entry = {"rows": n, "sessions": []}
            for name, all_s in times.items():
                best = min(all_s)
                entry["sessions"].append({"session": name, "seconds": round(best, 3),
                                          "all_seconds": [round(t, 3) for t in all_s],
                                          "requests_per_s": round(n / best, 1),
                                          "latencies_per_batch": round(best / args.latency, 2),
                                          "peak_in_flight": peaks[name]})
                print(f"N={n:4d}  {name:36s} {best:7.3f} s/batch = {n / best:7.1f} req/s "
                      f"({best / args.latency:5.1f} x latency; peak in flight {peaks[name]:3d}; "
                      f"all: {', '.join(f'{t:.3f}' for t in all_s)} s)")
            a, b = entry["sessions"]
            entry["ratio"] = round(a["seconds"] / b["seconds"], 2)
            print(f"N={n:4d}  ratio (default s / TolerantSession s) = {entry['ratio']:.2f}")
            results["batches"].append(entry)
    return results


# --- metrics ------------------------------------------------------------------------------------


def timed(fn, repeat: int) -> tuple[float, object]:
    """(median seconds of ``repeat`` calls after one warm-up, the last value)."""
    value = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def metrics(args: argparse.Namespace) -> dict:
    import torch
    from skimage.metrics import structural_similarity

    from step1x_batch.io.images import decode_image
    from step1x_batch.judge import metrics as m

    torch.set_num_threads(args.threads)
    settings = m.MetricSettings()
    results = {"threads": args.threads, "repeat": args.repeat, "sizes": []}
    print(f"metrics per row, median of {args.repeat} (after one warm-up), torch intra-op threads {args.threads}")
    for size in args.sizes:
        a = photo(size, 0)
        b = edited(a, 10)
        files = (png(a), png(b))
        pieces = {
            "decode 2 PNGs (context)": lambda: [decode_image(f, 40_000_000) for f in files],
            "image_metrics (whole call)": lambda: m.image_metrics(a, b, settings),
            "  changed_fraction": lambda: m.changed_fraction(a, b, settings.unchanged_tolerance),
            "  psnr": lambda: m.psnr(a, b),
            "  ssim (ours, scipy correlate1d)": lambda: m.ssim(a, b),
            "skimage structural_similarity": lambda: structural_similarity(
                a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                data_range=255),
        }
        entry = {"size": size, "ms": {}}
        values = {}
        for name, fn in pieces.items():
            seconds, values[name] = timed(fn, args.repeat)
            entry["ms"][name.strip()] = round(seconds * 1e3, 2)
            print(f"{size:5d}^2  {name:32s} {seconds * 1e3:9.2f} ms")
        ours, theirs = values["  ssim (ours, scipy correlate1d)"], values["skimage structural_similarity"]
        entry["ssim"], entry["ssim_skimage"] = ours, float(theirs)
        entry["ratio_ssim_skimage_over_ours"] = round(entry["ms"]["skimage structural_similarity"]
                                                      / entry["ms"]["ssim (ours, scipy correlate1d)"], 2)
        whole = values["image_metrics (whole call)"]
        entry["values"] = {k: whole[k] for k in ("changed_fraction", "psnr", "ssim")}
        print(f"{size:5d}^2  ssim ours {ours:.6f} vs skimage {theirs:.6f} (|diff| {abs(ours - theirs):.1e}); "
              f"skimage time / ours = {entry['ratio_ssim_skimage_over_ours']:.2f}; changed_fraction "
              f"{whole['changed_fraction']:.3f}, psnr {whole['psnr']:.1f} dB")
        assert abs(ours - theirs) < 1e-6, (ours, theirs)
        results["sizes"].append(entry)
    return results


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=["all", "http", "metrics", "_serve"])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64], help="http: rows per batch (N)")
    parser.add_argument("--latency", type=float, default=0.2, help="http: the server's seconds per request")
    parser.add_argument("--image-size", type=int, default=512, help="http: the PNGs in each request")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="metrics: image sides")
    parser.add_argument("--threads", type=int, default=1, help="metrics: torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=None,
                        help="http: batches per session (best reported; default 2); metrics: timed calls "
                             "(median; default 3)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.part == "_serve":
        serve(args.latency)
        return 0
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    import aiohttp
    import ray
    import torch

    print(f"ray {ray.__version__}, aiohttp {aiohttp.__version__}, torch {torch.__version__}")
    out = {}
    if args.part in ("all", "http"):
        out["http"] = http(argparse.Namespace(**{**vars(args), "repeat": args.repeat or 2}))
    if args.part in ("all", "metrics"):
        out["metrics"] = metrics(argparse.Namespace(**{**vars(args), "repeat": args.repeat or 3}))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
