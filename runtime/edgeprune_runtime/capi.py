"""The C-API-shaped surface of the runtime (modelled on onnxruntime-genai's `ort_genai_c.h`).

Rules, so that a C binding could mirror this file one to one:

- Objects are opaque integer handles (never 0) made by `Thing_Create` and released by
  `Thing_Destroy`; a destroyed or wrong-kind handle gives INVALID_ARGUMENT, not a crash.
- Every function returns a `Status` (an int, 0 = OK) and writes its result into an `Out` box.
- After a non-OK status, `GetLastError()` on the same thread returns the one-line message.
- Each docstring says who owns what a function returns and for how long it stays valid.
- Threads (README "Many requests at once"): a Bundle is shared: every Bundle_* call, Generator_Create and
  TokenizerStream_Create may run on any number of threads at once (ONNX Runtime's Run is thread-safe and
  each Generator has its own KV cache and I/O binding; the weights and sessions are shared). A Generator or
  TokenizerStream is driven by one thread at a time: a call on one that another thread is inside of returns
  INVALID_ARGUMENT ("in use by another thread"), never a crash or a corrupted cache; it may be handed to
  another thread between calls. Handles may be destroyed from any thread; a call still running on the
  destroyed object finishes, later calls get INVALID_ARGUMENT, and so does a second destroy.
- No exception leaves this layer, whatever the arguments (wrong types and arity included): the runtime
  raises RuntimeStatusError, which becomes its status; a call that does not match the function's
  signature is INVALID_ARGUMENT; MemoryError is RESOURCE_LIMIT; any other exception is a bug in the
  runtime and becomes INTERNAL_ERROR with the exception named in GetLastError() (tests treat it as a failure).
  KeyboardInterrupt and SystemExit are not errors of the call and pass through.

    st = Bundle_Create("export/tiny", out := Out());  bundle = out.value
    GeneratorParams_Create(out); params = out.value;  GeneratorParams_SetMaxNewTokens(params, 32)
    Generator_Create(bundle, params, "cam.png", "What is on the table?", False, out); gen = out.value
    while not (Generator_IsDone(gen, out), out.value)[1]:
        Generator_GenerateNextToken(gen); Generator_GetNextTokenId(gen, out)
    Generator_Destroy(gen); GeneratorParams_Destroy(params); Bundle_Destroy(bundle)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading

from edgeprune_runtime import checks
from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle
from edgeprune_runtime.tokenize import TextStream


class Out:
    """An out-parameter: the callee stores its result in `.value` (left untouched on failure)."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None

    def __repr__(self):
        return f"Out({self.value!r})"


_tls = threading.local()
_lock = threading.Lock()
_objects: dict[int, object] = {}
_busy: dict[int, threading.Lock] = {}  # per Generator/TokenizerStream handle: held during a call on it
_ids = itertools.count(1)


def GetLastError() -> str:
    """The message of the latest non-OK status returned on this thread ("" if none); a string owned by the caller."""
    return getattr(_tls, "last_error", "")


def _fail(status: Status, message: str) -> Status:
    _tls.last_error = message
    return status


def _api(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Status:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            return _fail(Status.INVALID_ARGUMENT, f"{fn.__name__}: {e}")
        try:
            fn(*args, **kwargs)
        except RuntimeStatusError as e:
            return _fail(e.status, e.message)
        except MemoryError:
            return _fail(Status.RESOURCE_LIMIT, f"{fn.__name__}: out of memory; lower EDGEPRUNE_MEMORY_BUDGET_MB or free memory")
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # a bug (or a Rust panic, a BaseException): say so instead of crashing the caller
            first = (str(e).splitlines() or [""])[0][:200]
            return _fail(Status.INTERNAL_ERROR, f"{fn.__name__}: internal error in edgeprune_runtime (a bug, please report it): "
                                                f"{type(e).__name__}: {first}")
        return Status.OK

    return wrapper


def _new(obj) -> int:
    with _lock:
        handle = next(_ids)
        _objects[handle] = obj
    return handle


def _live(handle, kind: type, what: str):
    """The object of `handle`; the caller holds `_lock`. INVALID_ARGUMENT for a dead or wrong-kind handle."""
    obj = _objects.get(handle) if isinstance(handle, int) and not isinstance(handle, bool) else None
    if not isinstance(obj, kind):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{checks.show(handle)} is not a live {what} handle (destroyed, or another kind)")
    return obj


def _get(handle, kind: type, what: str):
    with _lock:
        return _live(handle, kind, what)


@contextlib.contextmanager
def _using(handle, kind: type, what: str):
    """The live object of `handle`, held by this thread for the call (a Generator or TokenizerStream has state
    one call at a time may change). INVALID_ARGUMENT when another thread is inside a call on it."""
    with _lock:  # one critical section: a destroy cannot come between the look-up and the busy lock's creation
        obj = _live(handle, kind, what)
        busy = _busy.setdefault(handle, threading.Lock())
    if not busy.acquire(blocking=False):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{what} {handle} is in use by another thread; drive one "
                                 f"{what} from one thread at a time (a Bundle may be shared)")
    try:
        yield obj
    finally:
        busy.release()


def _drop(handle, kind: type, what: str) -> None:
    with _lock:
        _live(handle, kind, what)
        del _objects[handle]
        _busy.pop(handle, None)


def _put(out, value) -> None:
    if not isinstance(out, Out):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"the out-parameter must be an Out(), got {type(out).__name__}")
    out.value = value


def _check_out(out) -> None:
    if not isinstance(out, Out):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"the out-parameter must be an Out(), got {type(out).__name__}")


def live_handles() -> int:
    """How many handles are not destroyed yet (for leak checks in tests)."""
    with _lock:
        return len(_objects)


# --- Bundle ------------------------------------------------------------------------------------


@_api
def Bundle_Create(path, out: Out, verify_hashes: bool = True, memory_budget_mb: int | None = None,
                  max_image_pixels: int | None = None, backend: str = "auto") -> Status:
    """Loads the bundle at `path` (untrusted input, see the README's threat model): manifest (and file
    hashes unless `verify_hashes` is False), tokenizer, preprocessing and the three ONNX Runtime sessions
    (LM weights mapped once). `memory_budget_mb` and `max_image_pixels` override EDGEPRUNE_MEMORY_BUDGET_MB
    and EDGEPRUNE_MAX_IMAGE_PIXELS (budget.py). `backend` is "auto", "cpu", "cuda" or "trt" (backends/select.py;
    Bundle_GetBackend says which one auto chose and why).

    out.value: a Bundle handle, owned by the caller until Bundle_Destroy. Generators keep what they
    use alive, so destroying a bundle while its generators run is allowed.
    Fails with BUNDLE_INVALID (naming the bad file or key), RESOURCE_LIMIT (the bundle's buffers exceed the
    memory budget) or INVALID_ARGUMENT (a path that is not one, a bad option or EDGEPRUNE_* variable).
    """
    _check_out(out)
    if not isinstance(verify_hashes, bool):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"verify_hashes must be a bool, got {type(verify_hashes).__name__}")
    if not isinstance(backend, str):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"backend must be a str (auto, cpu, cuda, trt), got {type(backend).__name__}")
    _put(out, _new(LoadedBundle(path, verify_hashes=verify_hashes, memory_budget_mb=memory_budget_mb,
                                max_image_pixels=max_image_pixels, backend=backend)))


@_api
def Bundle_Destroy(bundle: int) -> Status:
    """Releases the handle; sessions and weights are freed once no generator uses them."""
    _drop(bundle, LoadedBundle, "Bundle")


@_api
def Bundle_GetShapes(bundle: int, out: Out) -> Status:
    """out.value: the bundle's static sizes (a frozen `Shapes`, immutable, owned by the caller)."""
    _put(out, _get(bundle, LoadedBundle, "Bundle").shapes)


@_api
def Bundle_GetBackend(bundle: int, out: Out) -> Status:
    """out.value: {"backend": "cpu"|"cuda"|"trt", "reason": str, "target": str | None}, a dict owned by the caller."""
    _put(out, _get(bundle, LoadedBundle, "Bundle").backend.to_dict())


@_api
def Bundle_GetManifest(bundle: int, out: Out) -> Status:
    """out.value: a deep copy of manifest.json as a dict, owned by the caller."""
    import copy

    _put(out, copy.deepcopy(_get(bundle, LoadedBundle, "Bundle").manifest.data))


@_api
def Bundle_DecodeTokens(bundle: int, token_ids, out: Out) -> Status:
    """out.value: the text of `token_ids` (a list, tuple or 1-D integer array; special tokens skipped), a str
    owned by the caller. INVALID_ARGUMENT for an id outside [0, vocabulary)."""
    b = _get(bundle, LoadedBundle, "Bundle")
    _check_out(out)
    _put(out, b.tokenizer.decode(token_ids))


# --- GeneratorParams ---------------------------------------------------------------------------


@_api
def GeneratorParams_Create(out: Out) -> Status:
    """out.value: a GeneratorParams handle with defaults (max_new_tokens 32, greedy, top_p 1, seed 0),
    owned by the caller until GeneratorParams_Destroy. Generator_Create copies it, so it may be
    changed or destroyed while generators made from it run."""
    _check_out(out)
    _put(out, _new(GeneratorParams()))


def _set(params: int, field: str, value) -> None:
    p = _get(params, GeneratorParams, "GeneratorParams")
    trial = GeneratorParams(**(p.__dict__ | {field: value}))
    trial.check()  # INVALID_ARGUMENT names the bad value; `p` stays as it was
    setattr(p, field, value)


@_api
def GeneratorParams_SetMaxNewTokens(params: int, max_new_tokens: int) -> Status:
    """Generation stops after this many tokens; 0 = until EOS or the cache is full. Must be >= 0."""
    _set(params, "max_new_tokens", max_new_tokens)


@_api
def GeneratorParams_SetTemperature(params: int, temperature: float) -> Status:
    """0 (default) = greedy; > 0 samples from softmax(logits / temperature)."""
    _set(params, "temperature", temperature)


@_api
def GeneratorParams_SetTopP(params: int, top_p: float) -> Status:
    """Nucleus sampling mass in (0, 1]; used only when temperature > 0."""
    _set(params, "top_p", top_p)


@_api
def GeneratorParams_SetSeed(params: int, seed: int) -> Status:
    """Seed (>= 0) of the sampler's numpy generator: same seed, same tokens."""
    _set(params, "seed", seed)


@_api
def GeneratorParams_SetIgnoreEos(params: int, ignore_eos: bool) -> Status:
    """When true, EOS does not stop generation: it goes on until max_new_tokens or a full cache (long runs, benchmarks)."""
    _set(params, "ignore_eos", ignore_eos)


@_api
def GeneratorParams_SetExactBoundary(params: int, exact_boundary: bool) -> Status:
    """When true, the prompt's last word (its last pre-token: " ta", a trailing space) is finished byte by byte from
    exact next-byte probabilities, marginalised over all its tokenizations, before token-by-token generation
    (README "Exact prompt boundaries"). Needs a byte-level BPE tokenizer and the bundle's step graph."""
    _set(params, "exact_boundary", exact_boundary)


@_api
def GeneratorParams_SetCachePolicy(params: int, policy: str) -> Status:
    """What a full KV cache does (README "Cache policies"): "stop" (generation ends with stop reason "cache_full"),
    "sink-window" or "heavy-hitter" (evict slots in place and go on). Default: the bundle's. A follow-up turn keeps
    its conversation's policy. Generator_Create refuses a policy the bundle or backend cannot serve."""
    _set(params, "cache_policy", policy)


@_api
def GeneratorParams_SetCacheSinks(params: int, sinks: int) -> Status:
    """The first cache slots no policy evicts (attention sinks); >= 0 and smaller than the capacity. Default: the bundle's."""
    _set(params, "cache_sinks", sinks)


@_api
def GeneratorParams_SetCachePinImage(params: int, pin_image: bool) -> Status:
    """heavy-hitter: when true, the image's kept visual slots are never evicted. Default: the bundle's."""
    _set(params, "cache_pin_image", pin_image)


@_api
def GeneratorParams_Destroy(params: int) -> Status:
    _drop(params, GeneratorParams, "GeneratorParams")


# --- Generator ---------------------------------------------------------------------------------


@_api
def Generator_Create(bundle: int, params: int, image, prompt: str, raw_prompt: bool, out: Out,
                     channels: str | None = None) -> Status:
    """Starts one request: loads `image`, builds the prompt
    (the bundle's chat template around `prompt`, or `prompt` itself when `raw_prompt`, which must then
    contain "<image>" once), runs the vision and prefill graphs and fills the KV cache.

    `image` is one of: a file path; encoded image bytes (PNG, JPEG, ...: bytes, bytearray or memoryview);
    a PIL image (used as is); a camera frame, numpy uint8 [H, W, 3], with `channels` "rgb" or "bgr" (required
    for a frame, refused for the others). Every kind gives the same pixel values for the same picture. The
    call copies what it needs: the caller's buffer may be reused as soon as it returns.

    out.value: a Generator handle, owned by the caller until Generator_Destroy; it holds its own KV cache.
    Fails with IMAGE_INVALID (also a frame of another dtype, shape or channel count, naming what was
    expected), PROMPT_TOO_LONG, INVALID_ARGUMENT (bad prompt or channels, or max_new_tokens that cannot fit
    the cache), INFERENCE_FAILED.
    """
    b = _get(bundle, LoadedBundle, "Bundle")
    p = _get(params, GeneratorParams, "GeneratorParams")
    _check_out(out)
    _put(out, _new(Generator(b, p, image, prompt, raw_prompt, channels)))


@_api
def Generator_CreateFollowUp(generator: int, params: int, prompt: str, raw_prompt: bool, out: Out) -> Status:
    """The next turn of `generator`'s conversation (multi-turn): `prompt` goes into the bundle's follow-up template
    (" USER: {prompt} ASSISTANT:" for LLaVA's vicuna template; verbatim when `raw_prompt`) and is appended to the
    generator's KV cache with one step-graph call: no image, vision or prefill of earlier turns. The answer so far
    stays in the cache (a final EOS does not, as the chat template writes none).

    `generator` must be done; it hands its cache to the new one and can then be read but not stepped
    (INVALID_ARGUMENT), and it may be destroyed independently; its logits are copied at the hand-over (the new
    turn's steps write the decode buffers they came from). out.value: a Generator handle owned by the caller.
    Fails with INVALID_ARGUMENT (not done, already followed up, an image token in the prompt, exact_boundary),
    PROMPT_TOO_LONG, CACHE_FULL (the conversation and max_new_tokens do not fit: start a new one), INFERENCE_FAILED.
    """
    p = _get(params, GeneratorParams, "GeneratorParams")
    _check_out(out)
    with _using(generator, Generator, "Generator") as g:
        _put(out, _new(g.follow_up(prompt, p, raw_prompt)))


@_api
def Generator_CreateOnCache(generator: int, params: int, image, prompt: str, raw_prompt: bool, out: Out,
                            channels: str | None = None) -> Status:
    """A new conversation (a new image) on the KV cache and decode buffers of `generator`, which must be done: as
    Generator_Create, without allocating a cache. `generator` hands them over and can then be read but not stepped
    (INVALID_ARGUMENT). out.value: a Generator handle owned by the caller. Fails as Generator_Create, and with
    INVALID_ARGUMENT when `generator` is not done or was handed over already."""
    p = _get(params, GeneratorParams, "GeneratorParams")
    _check_out(out)
    with _using(generator, Generator, "Generator") as g:
        _put(out, _new(Generator(g.bundle, p, image, prompt, raw_prompt, channels, reuse=g)))


@_api
def Generator_IsDone(generator: int, out: Out) -> Status:
    """out.value: True once generation stopped (see Generator_GetStopReason)."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.done)


@_api
def Generator_GenerateNextToken(generator: int) -> Status:
    """Computes the next token (the first one from the prefill logits, later ones with one decode step).

    Fails with CACHE_FULL when it stopped because the cache is full, INVALID_ARGUMENT when it stopped
    for another reason, INFERENCE_FAILED when ORT fails.
    Invalidates the view returned by Generator_GetLogits.
    """
    with _using(generator, Generator, "Generator") as g:
        g.generate_next_token()


@_api
def Generator_GetNextTokenId(generator: int, out: Out) -> Status:
    """out.value: the id produced by the latest Generator_GenerateNextToken (an int).
    INVALID_ARGUMENT before the first token."""
    with _using(generator, Generator, "Generator") as g:
        if not g.token_ids:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "no token yet; call Generator_GenerateNextToken first")
        _put(out, g.token_ids[-1])


@_api
def Generator_GetTokenIds(generator: int, out: Out) -> Status:
    """out.value: every generated id so far (a tuple owned by the caller; EOS included when it stopped there)."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, tuple(g.token_ids))


@_api
def Generator_GetLogits(generator: int, out: Out) -> Status:
    """out.value: read-only float view [vocab] of the latest logits: before the first
    GenerateNextToken the prefill's (the first token will be sampled from them), afterwards the ones
    the latest GenerateNextToken sampled its token from.

    The view aliases the generator's buffer: valid until the next call on this generator
    (GenerateNextToken overwrites it, Destroy frees it); copy it to keep it.
    """
    with _using(generator, Generator, "Generator") as g:
        view = g.logits.view()
        view.flags.writeable = False
        _put(out, view)


@_api
def Generator_GetStopReason(generator: int, out: Out) -> Status:
    """out.value: None while running, else "eos", "max_new_tokens" or "cache_full" (a str).

    "cache_full" is a normal stop: every KV-cache slot is used (a further GenerateNextToken returns CACHE_FULL)."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.stop_reason)


@_api
def Generator_GetVisualTokens(generator: int, out: Out) -> Status:
    """out.value: the number of valid visual slots the language model saw (an int)."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.visual_tokens)


@_api
def Generator_GetPromptTokenIds(generator: int, out: Out) -> Status:
    """out.value: the prompt's token ids with the image token in place of the visual slots (a tuple owned by the caller)."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, tuple(g.prompt_token_ids))


@_api
def Generator_GetCacheLength(generator: int, out: Out) -> Status:
    """out.value: KV-cache slots in use (prompt slots + decoded tokens), an int <= the capacity."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.cache.length)


@_api
def Generator_GetCacheStats(generator: int, out: Out) -> Status:
    """out.value: {"cache_policy": str, "cache_sinks": int, "evicted_slots": int (so far in this conversation)},
    a dict owned by the caller."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, {"cache_policy": g.policy.name, "cache_sinks": g.policy.sinks, "evicted_slots": g.evicted_slots})


@_api
def Generator_GetTimings(generator: int, out: Out) -> Status:
    """out.value: a dict of seconds spent in runtime calls (image_s, preprocess_s, vision_s, prefill_s,
    ttft_s, decode_s), tokens and decode_tokens_per_s (None below two tokens); a copy owned by the caller."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.timings.to_dict())


@_api
def Generator_GetBoundaryText(generator: int, out: Out) -> Status:
    """out.value: the text an exact-boundary generator chose byte by byte to finish the prompt's last word, before
    its first token (a str owned by the caller; "" before the first GenerateNextToken and without exact_boundary).
    The answer's text is this followed by the text of the token ids."""
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.boundary_text)


@_api
def Generator_GetNextByteProbs(generator: int, continuation, out: Out) -> Status:
    """out.value: P(next byte | prompt + `continuation`) as float64 [256] summing to 1, exact over every tokenization
    of the prompt's last word and of `continuation` (bytes or str; b"" for the prompt itself). A new array owned by
    the caller. Only for a generator made with exact_boundary and before its first GenerateNextToken
    (INVALID_ARGUMENT otherwise, and for a continuation no token sequence can produce); RESOURCE_LIMIT when the
    word has more tokenizations than byteprobs.MAX_NODES."""
    _check_out(out)
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.next_byte_probs(continuation))


@_api
def Generator_GetByteProbability(generator: int, continuation, out: Out) -> Status:
    """out.value: P(the answer starts with the bytes `continuation` | prompt), a float summed over every
    tokenization; the same conditions as Generator_GetNextByteProbs."""
    _check_out(out)
    with _using(generator, Generator, "Generator") as g:
        _put(out, g.byte_probability(continuation))


@_api
def Generator_Destroy(generator: int) -> Status:
    """Releases the generator and its KV cache; logits views from it become invalid."""
    _drop(generator, Generator, "Generator")


# --- TokenizerStream ---------------------------------------------------------------------------


@_api
def TokenizerStream_Create(bundle: int, out: Out) -> Status:
    """out.value: a TokenizerStream handle (incremental detokenizer), owned by the caller until
    TokenizerStream_Destroy; it keeps the bundle's tokenizer alive."""
    b = _get(bundle, LoadedBundle, "Bundle")
    _check_out(out)
    _put(out, _new(TextStream(b.tokenizer)))


@_api
def TokenizerStream_Decode(stream: int, token_id: int, out: Out) -> Status:
    """out.value: the text `token_id` adds to the stream ("" while a character is incomplete), a str owned by the caller.
    INVALID_ARGUMENT for an id outside [0, vocabulary); the stream is left as it was."""
    _check_out(out)
    with _using(stream, TextStream, "TokenizerStream") as s:
        _put(out, s.put(token_id))


@_api
def TokenizerStream_Flush(stream: int, out: Out) -> Status:
    """out.value: text held back so far (an incomplete character shows as U+FFFD); call it once
    generation is done so the pieces add up to the decoded text. A str owned by the caller."""
    _check_out(out)
    with _using(stream, TextStream, "TokenizerStream") as s:
        _put(out, s.flush())


@_api
def TokenizerStream_Destroy(stream: int) -> Status:
    _drop(stream, TextStream, "TokenizerStream")


__all__ = [name for name in dir() if name[0].isupper() and "_" in name] + ["Out", "GetLastError", "Status"]
