"""Server figures: overhead per request against the Python API, and time to first token under concurrency.

    .venv/bin/python scripts/record_result.py docs/results/serve-tiny.json -- \\
        .venv/bin/python scripts/serve_figures.py export/tiny --image demo/table.png

1. Overhead: the same request (PNG bytes, the prompt, greedy, --max-new-tokens tokens) through `Bundle.generate`
   in this process and as a non-streamed POST /v1/chat/completions to `edgeprune serve --parallel 1` (another
   process, idle meanwhile) from a stdlib HTTP client, alternately, `--repeats` pairs; overhead = the median of
   the pairs' differences (pairing cancels the drift of a shared machine), each side timed by the caller from
   the call to the complete answer.
2. Time to first token: `c` clients (1, 4, 8) start together (a barrier) and stream the same request; each one's
   time from sending to the first token chunk. `--rounds` rounds per `c`, for each `--parallel` setting of the
   server. The answers must equal the API's tokens (checked), or the figures are not of the same work.

Prints one JSON object (with provenance) on the last line.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))
from edgeprune.provenance import provenance  # noqa: E402

PROMPT = "What is on the table?"


def start_server(bundle: Path, parallel: int, log_dir: Path) -> tuple[subprocess.Popen, int]:
    out = log_dir / f"serve-{parallel}.out"
    with open(out, "w") as stdout, open(log_dir / f"serve-{parallel}.err", "w") as stderr:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("edgeprune")), "serve", str(bundle), "--port", "0",
                                 "--parallel", str(parallel), "--image-dir", "none"], stdout=stdout, stderr=stderr)
    for _ in range(1200):  # 120 s
        found = re.search(r"http://127\.0\.0\.1:(\d+)", out.read_text())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"error: serve exited: {(log_dir / f'serve-{parallel}.err').read_text()[-500:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("error: serve did not start in 120 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def body(image: bytes, max_tokens: int, stream: bool) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                                 {"type": "image_url", "image_url": {"url": url}}]}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()


def post(port: int, payload: bytes) -> tuple[float, dict]:
    """(seconds from sending to the complete answer, the JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", payload, {"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - t
    conn.close()
    if response.status != 200:
        raise SystemExit(f"error: the server answered {response.status}: {data[:300]!r}")
    return elapsed, json.loads(data)


def stream(port: int, payload: bytes, barrier: threading.Barrier) -> tuple[float, float, list[int]]:
    """(seconds to the first token chunk, seconds to [DONE], token ids) of one streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    barrier.wait()
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", payload, {"content-type": "application/json"})
    response = conn.getresponse()
    first, ids = None, []
    for raw in response:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            chunk = json.loads(line[6:])
            got = chunk["choices"][0].get("token_ids", []) if chunk.get("choices") else []
            if got and first is None:
                first = time.perf_counter() - t
            ids += got
    done = time.perf_counter() - t
    conn.close()
    return first, done, ids


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "n": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, required=True, help="a PNG/JPEG file")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30, help="requests per overhead side")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per concurrency level")
    ap.add_argument("--parallel", default="1,4", help="server --parallel settings to measure")
    ap.add_argument("--clients", default="1,4,8", help="concurrency levels")
    args = ap.parse_args()
    from edgeprune_runtime import Bundle

    image = args.image.read_bytes()
    report = {"bundle": str(args.bundle), "image": str(args.image), "max_new_tokens": args.max_new_tokens,
              "load_average_before": os.getloadavg(), "server": {}}
    with tempfile.TemporaryDirectory() as logs, Bundle(args.bundle) as bundle:
        expected = bundle.generate(image, PROMPT, max_new_tokens=args.max_new_tokens).token_ids  # warm-up too
        for parallel in (int(p) for p in args.parallel.split(",")):
            proc, port = start_server(args.bundle, parallel, Path(logs))
            try:
                entry = {}
                if parallel == 1:
                    post(port, body(image, args.max_new_tokens, False))  # warm-up
                    api_s, http_s, inside_s, api_ttft, http_ttft = [], [], [], [], []
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        result = bundle.generate(image, PROMPT, max_new_tokens=args.max_new_tokens)
                        api_s.append(time.perf_counter() - t)
                        assert result.token_ids == expected
                        api_ttft.append(result.ttft_s)
                        elapsed, answer = post(port, body(image, args.max_new_tokens, False))
                        assert answer["choices"][0]["token_ids"] == list(expected), "server tokens differ from the API's"
                        http_s.append(elapsed)
                        inside_s.append(answer["timings"]["request_s"])
                        http_ttft.append(answer["timings"]["ttft_s"])
                    diffs = [h - a for h, a in zip(http_s, api_s)]
                    entry["python_api"] = summary(api_s)
                    entry["request"] = summary(http_s)
                    entry["request_inside_server"] = summary(inside_s)
                    entry["runtime_ttft_api_s"] = statistics.median(api_ttft)  # inside the runtime, either side
                    entry["runtime_ttft_server_s"] = statistics.median(http_ttft)
                    entry["overhead_s"] = statistics.median(diffs)  # median of the paired differences
                    entry["overhead_vs_api"] = statistics.median(diffs) / statistics.median(api_s)
                entry["ttft"] = {}
                for clients in (int(c) for c in args.clients.split(",")):
                    firsts, dones = [], []
                    for _ in range(args.rounds):
                        barrier = threading.Barrier(clients)
                        results = [None] * clients

                        def client(i: int) -> None:
                            results[i] = stream(port, body(image, args.max_new_tokens, True), barrier)

                        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
                        for th in threads:
                            th.start()
                        for th in threads:
                            th.join(timeout=600)
                        for first, done, ids in results:
                            assert ids == list(expected), "a concurrent answer differs from the API's"
                            firsts.append(first)
                            dones.append(done)
                    entry["ttft"][str(clients)] = {"first_token": summary(firsts), "complete": summary(dones)}
                report["server"][f"parallel_{parallel}"] = entry
            finally:
                stop(proc)
    report["load_average_after"] = os.getloadavg()
    report["provenance"] = provenance()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
