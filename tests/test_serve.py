"""`edgeprune serve` against real HTTP clients: the `openai` package and curl, on 127.0.0.1, ephemeral ports.

The expected tokens come from `edgeprune run --json` on the same bundle, image and prompt (the CLI path, not
the server's code). Each server is a subprocess stopped with SIGTERM (it must exit 0); every wait is bounded.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGEPRUNE = Path(sys.executable).with_name("edgeprune")
PROMPT = "What is on the table?"
START_TIMEOUT_S = 120
CURL = shutil.which("curl")

pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        """SIGTERM; the server must shut down cleanly (uvicorn re-raises the signal once it has: rc -15)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        log = self.log.read_text()
        assert self.proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in log, log[-2000:]


def start_server(bundle: Path, workdir: Path, *args: str) -> Server:
    """`edgeprune serve BUNDLE --port 0 ...` in `workdir`; returns once it prints where it listens."""
    out, log = workdir / "serve.out", workdir / "serve.err"
    with open(out, "w") as stdout, open(log, "w") as stderr:
        proc = subprocess.Popen([str(EDGEPRUNE), "serve", str(bundle), "--port", "0", *args], stdout=stdout,
                                stderr=stderr, cwd=workdir, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"http://127\.0\.0\.1:(\d+)", out.read_text())
        if found:
            return Server(proc, f"http://127.0.0.1:{found.group(1)}", log)
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve did not start listening in time")


def run_json(bundle: Path, image: Path, *args: str) -> dict:
    done = subprocess.run([str(EDGEPRUNE), "run", str(bundle), "--image", str(image), "--prompt", PROMPT, "--json",
                           *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat_body(image_url: str, **options) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": image_url}}]}], **options}


def curl(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CURL, "-sS", "-N", "--max-time", str(int(timeout)), *args, url], capture_output=True,
                          text=True, timeout=timeout + 10)


def sse_events(text: str) -> list:
    """The `data:` payloads of a server-sent-events body, JSON-decoded except the final [DONE]."""
    payloads = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bundles):
    """A server over a copy of the tiny bundle (dir name `tiny`), the sample photo inside its image dir."""
    from edgeprune.sample_image import write_sample_image

    work = tmp_path_factory.mktemp("serve")
    bundle = work / "tiny"
    shutil.copytree(tiny_bundles[0.2], bundle)
    images = work / "images"
    images.mkdir()
    image = write_sample_image(images / "table.png")
    server = start_server(bundle, work, "--image-dir", str(images), "--parallel", "2", "--max-queue", "8",
                          "--max-request-mb", "1", "--max-image-pixels", "1000000")
    yield bundle, Path(image), server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[2].url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("sampling", [[], ["--temperature", "1.0", "--seed", "3"]], ids=["greedy", "sampled"])
def test_openai_client_gets_the_tokens_of_edgeprune_run(served, client, sampling):
    bundle, image, _ = served
    expected = run_json(bundle, image, "--max-new-tokens", "12", *sampling)
    options = {"temperature": 1.0, "seed": 3} if sampling else {"temperature": 0}
    for url in (data_url(image), image.name, str(image), image.as_uri()):  # data URL, relative/absolute path, file URL
        completion = client.chat.completions.create(model="tiny", max_tokens=12, messages=chat_body(url)["messages"],
                                                    **options)
        choice = completion.choices[0]
        assert choice.model_extra["token_ids"] == expected["token_ids"], url[:40]
        assert choice.message.content == expected["text"]
        assert choice.finish_reason == "length"  # 12 tokens, no EOS from the tiny twin here
        assert completion.usage.completion_tokens == 12
        assert completion.usage.prompt_tokens == expected["prompt_tokens"] + expected["visual_tokens"]
    if sampling:
        assert len(set(expected["token_ids"])) > 3  # a varied answer: a slot or seed mix-up would show


def test_openai_client_streams_the_same_text(served, client):
    bundle, image, _ = served
    expected = run_json(bundle, image, "--max-new-tokens", "10", "--temperature", "1.0", "--seed", "3")
    stream = client.chat.completions.create(model="tiny", max_tokens=10, temperature=1.0, seed=3, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=chat_body(data_url(image))["messages"])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [i for c in chunks if c.choices for i in (c.choices[0].model_extra.get("token_ids") or [])]
    assert text == expected["text"] and ids == expected["token_ids"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(served, tmp_path):
    bundle, image, server = served
    expected = run_json(bundle, image, "--max-new-tokens", "8")
    body = tmp_path / "body.json"
    body.write_text(json.dumps(chat_body(data_url(image), max_tokens=8, temperature=0, stream=True)))
    done = curl(server.url + "/v1/chat/completions", "-H", "content-type: application/json", "--data-binary",
                f"@{body}", "-D", str(tmp_path / "headers"))
    assert done.returncode == 0, done.stderr
    assert "text/event-stream" in (tmp_path / "headers").read_text()
    events = sse_events(done.stdout)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    ids = [i for c in chunks for i in c["choices"][0].get("token_ids", [])]
    assert ids == expected["token_ids"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1


def test_stop_string_cuts_the_answer(served, client):
    bundle, image, _ = served
    expected = run_json(bundle, image, "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "3")["text"]
    stop = expected[5:7]  # two characters from the middle of the answer
    cut = expected[:expected.index(stop)]
    for stream in (False, True):
        response = client.chat.completions.create(model="tiny", max_tokens=12, temperature=1.0, seed=3, stop=[stop],
                                                  stream=stream, messages=chat_body(data_url(image))["messages"])
        if stream:
            chunks = list(response)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = response.choices[0].message.content, response.choices[0].finish_reason
        assert text == cut and reason == "stop", (stream, text, cut)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = curl(served[2].url + "/health")
    assert json.loads(health.stdout) == {"status": "ok", "model": "tiny", "slots": {"parallel": 2, "busy": 0, "waiting": 0}}


def _error(done: subprocess.CompletedProcess) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a `curl -w '\\n%{http_code}'` call."""
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


def _post(server: Server, tmp_path: Path, payload: bytes) -> tuple[int, dict]:
    body = tmp_path / "payload"
    body.write_bytes(payload)
    return _error(curl(server.url + "/v1/chat/completions", "-H", "content-type: application/json",
                       "--data-binary", f"@{body}", "-w", "\n%{http_code}"))


def test_bad_requests_get_a_4xx_with_a_json_message(served, tmp_path):
    from PIL import Image

    bundle, image, server = served
    good = chat_body(data_url(image), max_tokens=2)
    big = tmp_path / "big.png"  # 1001 x 1000 pixels: over the server's --max-image-pixels 1000000, a small file
    Image.new("RGB", (1001, 1000)).save(big)
    outside = tmp_path / "outside.png"
    shutil.copy(image, outside)
    cases = {
        "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        "not an object": (b"[1, 2]", 400, "JSON object"),
        "missing image": (json.dumps({**good, "messages": [{"role": "user", "content": PROMPT}]}).encode(), 400,
                          "missing image"),
        "no image part": (json.dumps({**good, "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT}]}]}).encode(), 400, "missing image"),
        "oversized image (pixels)": (json.dumps(chat_body(data_url(big), max_tokens=2)).encode(), 400, "pixels"),
        "oversized request": (json.dumps(chat_body("data:image/png;base64," + "A" * (2 << 20))).encode(), 413,
                              "larger than 1 MiB"),
        "unknown model": (json.dumps({**good, "model": "gpt-4o"}).encode(), 404, "not served here"),
        "broken base64": (json.dumps(chat_body("data:image/png;base64,@@@", max_tokens=2)).encode(), 400, "base64"),
        "not an image": (json.dumps(chat_body("data:image/png;base64," + base64.b64encode(b"hello").decode(),
                                              max_tokens=2)).encode(), 400, "not a readable image"),
        "remote URL": (json.dumps(chat_body("https://example.com/cat.png")).encode(), 400, "not fetched"),
        "path outside --image-dir": (json.dumps(chat_body(str(outside))).encode(), 400, "outside the image directory"),
        "missing file": (json.dumps(chat_body("nope.png")).encode(), 400, "not found"),
        "two turns": (json.dumps({**good, "messages": good["messages"] * 2}).encode(), 400, "exactly one message"),
        "temperature": (json.dumps({**good, "temperature": 9}).encode(), 400, "temperature"),
        "negative seed": (json.dumps({**good, "seed": -1}).encode(), 400, "seed"),
        "max_tokens zero": (json.dumps({**good, "max_tokens": 0}).encode(), 400, "max_tokens"),
        "max_tokens past the cache": (json.dumps({**good, "max_tokens": 100000}).encode(), 400, "cache slots"),
        "n=2": (json.dumps({**good, "n": 2}).encode(), 400, "n must be 1"),
    }
    for name, (payload, status, words) in cases.items():
        got, body = _post(server, tmp_path, payload)
        assert got == status, (name, body)
        assert words in body["error"]["message"], (name, body)
        assert body["error"]["type"] == "invalid_request_error"
    wrong_method = _error(curl(server.url + "/v1/chat/completions", "-w", "\n%{http_code}"))
    assert wrong_method[0] == 405 and "error" in wrong_method[1]
    assert _error(curl(server.url + "/v2/nothing", "-w", "\n%{http_code}"))[0] == 404
    # still serving
    assert _post(server, tmp_path, json.dumps({**good, "temperature": 0}).encode())[1]["choices"][0]["finish_reason"]


def test_openai_client_raises_on_an_unknown_model(served, client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", max_tokens=2, messages=chat_body(data_url(served[1]))["messages"])
    assert "not served here" in str(e.value)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_eight_concurrent_streams_all_finish_with_the_same_tokens(served, tmp_path):
    bundle, image, server = served
    expected = run_json(bundle, image, "--max-new-tokens", "16")["token_ids"]
    body = tmp_path / "body.json"
    body.write_text(json.dumps(chat_body(data_url(image), max_tokens=16, temperature=0, stream=True)))
    procs = [subprocess.Popen([CURL, "-sS", "-N", "--max-time", "120", "-H", "content-type: application/json",
                               "--data-binary", f"@{body}", server.url + "/v1/chat/completions"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outputs = [p.communicate(timeout=150) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        events = sse_events(out)
        assert events[-1] == "[DONE]"
        assert [i for c in events[:-1] for i in c["choices"][0].get("token_ids", [])] == expected
    assert json.loads(curl(server.url + "/health").stdout)["slots"] == {"parallel": 2, "busy": 0, "waiting": 0}


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, tiny, tiny_recipe):
    """One slot, no queue, over a tiny bundle with a 30000-slot cache: an answer to the end of the cache takes
    minutes (decode reads the whole cache each step), so a slot that is not freed on disconnect shows."""
    from edgeprune.export import export_bundle
    from edgeprune.sample_image import write_sample_image

    work = tmp_path_factory.mktemp("slow")
    base = tiny_recipe(0.2)
    recipe = dataclasses.replace(base, shapes=dataclasses.replace(base.shapes, new_token_slots=30000))
    bundle = export_bundle("llava-next-tiny", work / "slow", recipe, loaded=tiny)
    image = write_sample_image(work / "table.png")
    server = start_server(bundle, work, "--parallel", "1", "--max-queue", "0")
    yield Path(image), server
    server.stop()


def _health(server: Server) -> dict:
    return json.loads(curl(server.url + "/health").stdout)["slots"]


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_client_that_disconnects_mid_stream_frees_its_slot(slow_server):
    import openai
    from openai import OpenAI

    image, server = slow_server
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = chat_body(data_url(image))["messages"]
    stream = client.chat.completions.create(model="slow", temperature=0, stream=True, messages=messages)  # to the full cache
    received = 0
    for chunk in stream:
        received += len(chunk.choices[0].model_extra.get("token_ids") or [])
        if received == 3:
            break
    assert _health(server) == {"parallel": 1, "busy": 1, "waiting": 0}
    with pytest.raises(openai.APIStatusError) as e:  # one slot taken, a queue of 0: refused at once
        client.chat.completions.create(model="slow", max_tokens=2, temperature=0, messages=messages)
    assert e.value.status_code == 503 and "busy" in str(e.value)
    stream.close()  # hang up mid-stream
    assert _wait_for(lambda: _health(server)["busy"] == 0, timeout=20), _health(server)
    answer = client.chat.completions.create(model="slow", max_tokens=4, temperature=0, messages=messages)
    assert answer.usage.completion_tokens == 4
