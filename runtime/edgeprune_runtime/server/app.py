"""The ASGI app (Starlette): /v1/chat/completions, /v1/models, /health, over one loaded bundle.

Requests share the bundle. Each one holds a *slot* from the moment its generator is made until its last
token is sent: `parallel` slots generate at once (the runtime runs different generators of one bundle
concurrently, each driven by one thread at a time), later requests wait in a queue of at most `max_queue`,
and a full queue answers 503. A client that goes away while waiting, or mid-stream, frees its slot at the
next token. The runtime runs in worker threads (image, vision and prefill in the thread pool, decoding in a
thread per answer), so the event loop keeps serving. Needs an asyncio event loop (uvicorn's).

The vision and prefill graphs run before the response starts, so a bad image or an over-long prompt is
still a 4xx with a JSON body; a streamed answer then begins with its first token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeprune_runtime.api import Bundle, Generator
from edgeprune_runtime.errors import RuntimeStatusError
from edgeprune_runtime.server.protocol import (FINISH_REASON, ApiError, ChatRequest, Completion, ImagePolicy,
                                               StopText, parse_chat_request, usage)

WAIT_POLL_S = 0.25  # how often a queued request checks that its client is still there


@dataclass(frozen=True)
class ServerOptions:
    model_name: str  # the id clients send as "model" and /v1/models lists
    parallel: int = 1  # requests generating at once
    max_queue: int = 32  # requests waiting for a slot before the server answers 503
    max_request_bytes: int = 32 << 20  # a request body (JSON with a base64 image) larger than this gets 413
    image_dir: Path | None = None  # local image paths are read only inside it (None: data URLs only)


class Slots:
    """`parallel` generation slots and a bounded queue in front of them."""

    def __init__(self, parallel: int, max_queue: int):
        self.parallel = parallel
        self.max_queue = max_queue
        self.waiting = 0
        self._free = anyio.Semaphore(parallel)

    @property
    def busy(self) -> int:
        return self.parallel - self._free.value

    async def acquire(self, request: Request) -> bool:
        """Waits for a slot; False when the client disconnected meanwhile. ApiError(503) on a full queue."""
        if self._free.value == 0 and self.waiting >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.busy} requests generating, {self.waiting} waiting); "
                                "retry later", code="server_busy")
        self.waiting += 1
        try:
            while True:
                with anyio.move_on_after(WAIT_POLL_S):
                    await self._free.acquire()
                    return True
                if await request.is_disconnected():
                    return False
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._free.release()


def create_app(bundle: Bundle, options: ServerOptions) -> Starlette:
    """The Starlette app serving `bundle` (loaded by the caller, who closes it after the server stops)."""
    slots = Slots(options.parallel, options.max_queue)
    images = ImagePolicy(options.image_dir.resolve() if options.image_dir is not None else None)
    created = _created(bundle)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": options.model_name,
                             "slots": {"parallel": slots.parallel, "busy": slots.busy, "waiting": slots.waiting}})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": options.model_name, "object": "model", "created": created, "owned_by": "edgeprune"}]})

    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        body = _decode_json(await _read_body(request, options.max_request_bytes))
        chat = parse_chat_request(body, options.model_name, images)
        if not await slots.acquire(request):
            return Response(status_code=499)  # the client is gone: nobody reads this (nginx's "client closed")
        try:
            gen = await anyio.to_thread.run_sync(_start, bundle, chat)  # image, vision, prefill
        except BaseException:
            slots.release()
            raise
        try:
            answer = _Answer(bundle, gen, chat, Completion(options.model_name), arrived)
        except BaseException:
            gen.close()
            slots.release()
            raise
        if chat.stream:
            return _EventStream(answer, slots.release)
        try:
            result = await answer.whole(request)
        finally:
            try:
                await answer.aclose()
            finally:
                slots.release()
        return JSONResponse(result) if result is not None else Response(status_code=499)

    async def api_error(request: Request, e: ApiError) -> Response:
        return JSONResponse(e.to_dict(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException) -> Response:
        error = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}")
        return JSONResponse(error.to_dict(), status_code=e.status_code)

    async def runtime_error(request: Request, e: RuntimeStatusError) -> Response:
        error = ApiError.from_runtime(e)
        return JSONResponse(error.to_dict(), status_code=error.status)

    return Starlette(
        routes=[Route("/health", health), Route("/v1/models", models),
                Route("/v1/chat/completions", chat_completions, methods=["POST"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error, RuntimeStatusError: runtime_error},
    )


def _created(bundle: Bundle) -> int:
    """The bundle's export time (manifest `created`, ISO 8601) as a Unix time; 0 when absent or unreadable."""
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(bundle.manifest.get("created", "")).timestamp())
    except (TypeError, ValueError):
        return 0


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is larger than {limit >> 20} MiB; send a smaller image "
                            "(or start serve with a larger --max-request-mb)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ApiError(400, f"the request body is not valid JSON ({first})", code="invalid_json") from None


def _start(bundle: Bundle, chat: ChatRequest) -> Generator:
    """In a worker thread: loads the image and runs the vision and prefill graphs (RuntimeStatusError -> 4xx/5xx)."""
    return bundle.generator(chat.image, chat.prompt, max_new_tokens=chat.max_tokens, temperature=chat.temperature,
                            top_p=chat.top_p, seed=chat.seed)


_END = object()  # the producer's last item


class _Answer:
    """One request's generation. A thread of its own runs the runtime steps back to back (decode, detokenize,
    stop strings) and hands (token id, text) items to the event loop without waiting for it; the loop sends
    them. A round trip through a thread pool per token would cost a few ms each on a busy machine.

    Threads: the producer alone drives the generator, the text stream and the stop cutter until it has put
    _END (or an exception); `aclose` stops it between two steps and waits for it before closing the generator."""

    def __init__(self, bundle: Bundle, gen: Generator, chat: ChatRequest, completion: Completion, arrived: float):
        self.gen = gen
        self.chat = chat
        self.completion = completion
        self.arrived = arrived  # perf_counter() when the request arrived
        self.text = bundle.text_stream()
        self.stop = StopText(chat.stop)
        self._cancel = threading.Event()
        self._items: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        threading.Thread(target=self._produce, args=(loop,), name="edgeprune-generate", daemon=True).start()

    def _produce(self, loop: asyncio.AbstractEventLoop) -> None:
        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(self._items.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server is gone
                self._cancel.set()

        try:
            while not (self.gen.done or self.stop.stopped or self._cancel.is_set()):
                token = self.gen.generate_next_token()
                put((token, self.stop.feed(self.text.put(token))))
            put(_END)
        except BaseException as e:  # RuntimeStatusError mid-answer (INFERENCE_FAILED, ...): the consumer re-raises it
            put(e)
        finally:
            try:
                loop.call_soon_threadsafe(lambda: self._finished.done() or self._finished.set_result(None))
            except RuntimeError:
                pass

    async def next(self) -> tuple[int, str] | None:
        """The next (token id, text safe to send), None once generation has stopped."""
        item = await self._items.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def tail(self) -> str:
        """Text held back at the end (an incomplete character, a partial stop string that never completed).
        Only after next() returned None: the producer is done with the text stream then."""
        if self.stop.stopped:
            return ""
        rest = self.stop.feed(self.text.flush())
        return rest if self.stop.stopped else rest + self.stop.flush()

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stop.stopped else FINISH_REASON[self.gen.stop_reason]

    def usage(self) -> dict:
        prompt = len(self.gen.prompt_token_ids) - 1 + self.gen.visual_tokens  # the image token -> the visual slots
        return usage(prompt, len(self.gen.token_ids))

    def timings(self) -> dict:
        return self.gen.timings | {"request_s": time.perf_counter() - self.arrived}  # arrival -> answer complete

    async def whole(self, request: Request) -> dict | None:
        """The non-streamed answer; None if the client disconnected before it was complete."""
        ids, pieces = [], []
        while (item := await self.next()) is not None:
            ids.append(item[0])
            pieces.append(item[1])
            if await request.is_disconnected():
                return None
        pieces.append(self.tail())
        return self.completion.message("".join(pieces), self.finish_reason, ids, self.usage(), self.timings())

    async def aclose(self) -> None:
        """Stops the producer after its current step, waits for it, then frees the generator (idempotent)."""
        self._cancel.set()
        try:
            await asyncio.shield(self._finished)
        finally:
            self.text.close()
            self.gen.close()


class _EventStream(Response):
    """A server-sent-events response (`data: {chunk}` per token, then `data: [DONE]`) that owns its answer's
    slot: however it ends (finished, client gone, cancelled by shutdown), the generator is closed and the slot
    released."""

    media_type = "text/event-stream"

    def __init__(self, answer: _Answer, release):
        # not Response.__init__: it would add "content-length: 0" for the empty body
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.answer = answer
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        answer, completion = self.answer, self.answer.completion
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await _event(send, completion.chunk({"role": "assistant", "content": ""}))
            while (item := await answer.next()) is not None:
                token, text = item
                await _event(send, completion.chunk({"content": text} if text else {}, token_ids=[token]))
                if await _gone(receive):
                    return
            rest = answer.tail()
            await _event(send, completion.chunk({"content": rest} if rest else {}, answer.finish_reason))
            if answer.chat.include_usage:
                await _event(send, completion.usage_chunk(answer.usage()))
            await _event(send, "[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except RuntimeStatusError as e:  # mid-stream: the status line is sent, so the error is the last event
            await _event(send, ApiError.from_runtime(e).to_dict())
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were sending
            pass
        finally:
            try:
                await answer.aclose()
            finally:
                self.release()


async def _event(send, data) -> None:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    await send({"type": "http.response.body", "body": f"data: {payload}\n\n".encode(), "more_body": True})


async def _gone(receive) -> bool:
    """True once the client has disconnected; never waits (the request body was read already)."""
    message = {}
    with anyio.CancelScope() as scope:
        scope.cancel()
        message = await receive()
    return message.get("type") == "http.disconnect"
