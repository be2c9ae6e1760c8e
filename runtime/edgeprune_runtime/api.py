"""The Pythonic wrapper over `capi`: the only place where a status becomes an exception.

    from edgeprune_runtime import Bundle

    with Bundle("export/tiny") as bundle:
        result = bundle.generate("cam.png", "What is on the table?", max_new_tokens=32,
                                 on_text=lambda s: print(s, end="", flush=True))
    result.text, result.stop_reason, result.ttft_s

Every method raises RuntimeStatusError (with `.status` and a one-line `.message`) on failure.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from edgeprune_runtime import capi
from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.manifest import Shapes


def _check(status: int) -> None:
    if status != Status.OK:
        raise RuntimeStatusError(Status(status), capi.GetLastError())


def _call(fn, *args):
    """Calls a capi getter/creator and returns what it wrote into its Out box."""
    out = capi.Out()
    _check(fn(*args, out))
    return out.value


@dataclass(frozen=True)
class Result:
    token_ids: tuple[int, ...]  # generated ids (the EOS id included when generation stopped on it)
    text: str  # the answer: boundary_text followed by the text of token_ids (special tokens skipped)
    stop_reason: str  # "eos" | "max_new_tokens" | "cache_full"
    visual_tokens: int  # valid visual slots the language model saw
    prompt_tokens: int  # text tokens of the prompt (BOS included, image token excluded)
    cache_slots_used: int  # of shapes.cache_capacity
    ttft_s: float  # image load -> first token id (time inside the runtime)
    decode_tokens_per_s: float | None  # (tokens - 1) / time after the first token; None below 2 tokens
    timings: dict  # per stage seconds: image_s, preprocess_s, vision_s, prefill_s, ttft_s, decode_s
    boundary_text: str = ""  # exact_boundary: the bytes that finished the prompt's last word, chosen before token_ids
    backend: str = "cpu"  # "cpu" | "cuda" | "trt": where it ran (Bundle.backend says why)
    cache_policy: str = "stop"  # what a full cache did: stop | sink-window | heavy-hitter
    evicted_slots: int = 0  # cache slots evicted so far in this conversation

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_ids"] = list(self.token_ids)
        return d


def _set_params(params: int, max_new_tokens: int = 32, raw_prompt: bool = False, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False, exact_boundary: bool = False,
                cache_policy: str | None = None, cache_sinks: int | None = None,
                cache_pin_image: bool | None = None) -> None:
    """The options on a GeneratorParams handle; the cache options only when given (None: the bundle's default)."""
    for setter, value in ((capi.GeneratorParams_SetCachePolicy, cache_policy),
                          (capi.GeneratorParams_SetCacheSinks, cache_sinks),
                          (capi.GeneratorParams_SetCachePinImage, cache_pin_image)):
        if value is not None:
            _check(setter(params, value))
    _check(capi.GeneratorParams_SetMaxNewTokens(params, max_new_tokens))
    _check(capi.GeneratorParams_SetTemperature(params, temperature))
    _check(capi.GeneratorParams_SetTopP(params, top_p))
    _check(capi.GeneratorParams_SetSeed(params, seed))
    _check(capi.GeneratorParams_SetIgnoreEos(params, ignore_eos))
    _check(capi.GeneratorParams_SetExactBoundary(params, exact_boundary))


class Generator:
    """One request, step by step (Bundle.generator). Iterating yields token ids until generation stops."""

    def __init__(self, bundle: "Bundle", image, prompt: str, *, max_new_tokens: int = 32, raw_prompt: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False,
                 exact_boundary: bool = False, channels: str | None = None, cache_policy: str | None = None,
                 cache_sinks: int | None = None, cache_pin_image: bool | None = None):
        """cache_policy / cache_sinks / cache_pin_image: None takes the Bundle's option, else the bundle's default."""
        params = _call(capi.GeneratorParams_Create)
        try:
            cache = bundle._cache_options(cache_policy=cache_policy, cache_sinks=cache_sinks, cache_pin_image=cache_pin_image)
            _set_params(params, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        ignore_eos=ignore_eos, exact_boundary=exact_boundary, **cache)
            out = capi.Out()
            _check(capi.Generator_Create(bundle._live(), params, image, prompt, raw_prompt, out, channels=channels))
            self._handle = out.value
        finally:
            capi.GeneratorParams_Destroy(params)
        self._finalize = weakref.finalize(self, capi.Generator_Destroy, self._handle)

    @classmethod
    def _wrap(cls, handle: int) -> "Generator":
        gen = cls.__new__(cls)
        gen._handle = handle
        gen._finalize = weakref.finalize(gen, capi.Generator_Destroy, handle)
        return gen

    def _live(self) -> int:
        if not self._finalize.alive:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this generator is closed")
        return self._handle

    def new_conversation(self, image, prompt: str, *, channels: str | None = None, **options) -> "Generator":
        """A new request (options as in Bundle.generator; cache options None = the bundle's default) on this done
        generator's cache and buffers."""
        params = _call(capi.GeneratorParams_Create)
        try:
            _set_params(params, **options)
            out = capi.Out()
            _check(capi.Generator_CreateOnCache(self._live(), params, image, prompt, options.get("raw_prompt", False),
                                                out, channels=channels))
            return Generator._wrap(out.value)
        finally:
            capi.GeneratorParams_Destroy(params)

    def follow_up(self, prompt: str, *, max_new_tokens: int = 32, raw_prompt: bool = False, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False) -> "Generator":
        """The next turn of this conversation (this generator must be done; it hands its cache over)."""
        params = _call(capi.GeneratorParams_Create)
        try:
            _set_params(params, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        ignore_eos=ignore_eos)
            return Generator._wrap(_call(capi.Generator_CreateFollowUp, self._live(), params, prompt, raw_prompt))
        finally:
            capi.GeneratorParams_Destroy(params)

    @property
    def done(self) -> bool:
        return _call(capi.Generator_IsDone, self._live())

    def generate_next_token(self) -> int:
        """Runs one step and returns the new token id."""
        _check(capi.Generator_GenerateNextToken(self._live()))
        return _call(capi.Generator_GetNextTokenId, self._handle)

    def __iter__(self) -> Iterator[int]:
        while not self.done:
            yield self.generate_next_token()

    @property
    def token_ids(self) -> tuple[int, ...]:
        return _call(capi.Generator_GetTokenIds, self._live())

    @property
    def logits(self):
        """Read-only view [vocab] of the logits the latest token was sampled from (before the first step:
        the prefill's); valid until the next step of this generator (copy it to keep it)."""
        return _call(capi.Generator_GetLogits, self._live())

    @property
    def stop_reason(self) -> str | None:
        return _call(capi.Generator_GetStopReason, self._live())

    @property
    def boundary_text(self) -> str:
        """exact_boundary: the text chosen byte by byte to finish the prompt's last word (after the first token)."""
        return _call(capi.Generator_GetBoundaryText, self._live())

    def next_byte_probs(self, continuation: bytes | str = b""):
        """float64 [256]: P(next byte | prompt + continuation), exact over all tokenizations (exact_boundary
        generators, before the first token)."""
        return _call(capi.Generator_GetNextByteProbs, self._live(), continuation)

    def byte_probability(self, continuation: bytes | str) -> float:
        """P(the answer starts with `continuation` | prompt), summed over all its tokenizations."""
        return _call(capi.Generator_GetByteProbability, self._live(), continuation)

    @property
    def visual_tokens(self) -> int:
        return _call(capi.Generator_GetVisualTokens, self._live())

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return _call(capi.Generator_GetPromptTokenIds, self._live())

    @property
    def cache_length(self) -> int:
        return _call(capi.Generator_GetCacheLength, self._live())

    @property
    def timings(self) -> dict:
        return _call(capi.Generator_GetTimings, self._live())

    @property
    def cache_stats(self) -> dict:
        """{"cache_policy", "cache_sinks", "evicted_slots"} (Generator_GetCacheStats)."""
        return _call(capi.Generator_GetCacheStats, self._live())

    def close(self) -> None:
        self._finalize()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TokenizerStream:
    """Incremental detokenizer (Bundle.text_stream): `put(token_id)` returns the text that token adds ("" while a
    character is incomplete); `flush()` at the end returns what is held back, so the pieces add up to the text."""

    def __init__(self, bundle: "Bundle"):
        self._handle = _call(capi.TokenizerStream_Create, bundle._live())
        self._finalize = weakref.finalize(self, capi.TokenizerStream_Destroy, self._handle)

    def put(self, token_id: int) -> str:
        return _call(capi.TokenizerStream_Decode, self._handle, token_id)

    def flush(self) -> str:
        return _call(capi.TokenizerStream_Flush, self._handle)

    def close(self) -> None:
        self._finalize()


class Bundle:
    """A loaded bundle (manifest checked, sessions open). Use as a context manager or call close()."""

    def __init__(self, path, *, verify_hashes: bool = True, memory_budget_mb: int | None = None,
                 max_image_pixels: int | None = None, backend: str = "auto", cache_policy: str | None = None,
                 cache_sinks: int | None = None, cache_pin_image: bool | None = None):
        """Options as in capi.Bundle_Create (backend: auto, cpu, cuda, trt); the cache options (None: the bundle's
        default, README "Cache policies") apply to every generator of this Bundle that does not give its own.
        Raises RuntimeStatusError."""
        self._cache = {"cache_policy": cache_policy, "cache_sinks": cache_sinks, "cache_pin_image": cache_pin_image}
        out = capi.Out()
        _check(capi.Bundle_Create(path, out, verify_hashes=verify_hashes, memory_budget_mb=memory_budget_mb,
                                  max_image_pixels=max_image_pixels, backend=backend))
        self._handle = out.value
        self._finalize = weakref.finalize(self, capi.Bundle_Destroy, self._handle)

    def _live(self) -> int:
        if not self._finalize.alive:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this bundle is closed")
        return self._handle

    def _cache_options(self, **given) -> dict:
        """The cache options of one generator: each one given, else this Bundle's."""
        return {k: given[k] if given[k] is not None else v for k, v in self._cache.items()}

    @property
    def shapes(self) -> Shapes:
        return _call(capi.Bundle_GetShapes, self._live())

    @property
    def backend(self) -> dict:
        """{"backend": "cpu"|"cuda"|"trt", "reason": why (auto lists what it skipped), "target": engines' target}."""
        return _call(capi.Bundle_GetBackend, self._live())

    @property
    def manifest(self) -> dict:
        return _call(capi.Bundle_GetManifest, self._live())

    def decode(self, token_ids) -> str:
        return _call(capi.Bundle_DecodeTokens, self._live(), token_ids)

    def text_stream(self) -> TokenizerStream:
        """A new incremental detokenizer for one answer (one per generator)."""
        return TokenizerStream(self)

    def generator(self, image, prompt: str, **options) -> Generator:
        """A step-by-step generator; options as in `generate` (without on_text)."""
        return Generator(self, image, prompt, **options)

    def next_byte_probs(self, image, prompt: str, continuation: bytes | str = b"", raw_prompt: bool = False,
                        channels: str | None = None):
        """float64 [256]: P(next byte | prompt + continuation) about `image`, marginalised over every tokenization
        of the prompt's last word and the continuation (README "Exact prompt boundaries")."""
        with Generator(self, image, prompt, raw_prompt=raw_prompt, exact_boundary=True, channels=channels) as gen:
            return gen.next_byte_probs(continuation)

    def generate(self, image, prompt: str, max_new_tokens: int = 32, raw_prompt: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False,
                 exact_boundary: bool = False, on_text: Callable[[str], None] | None = None,
                 channels: str | None = None, cache_policy: str | None = None, cache_sinks: int | None = None,
                 cache_pin_image: bool | None = None) -> Result:
        """Answers `prompt` about `image`: a file path, encoded image bytes, a PIL image, or a camera frame
        (numpy uint8 [H, W, 3]) with `channels="rgb"` or `channels="bgr"` (OpenCV's order; required for a frame).

        `prompt` goes into the bundle's chat template unless `raw_prompt` (then it must contain
        "<image>" once). temperature 0 is greedy; otherwise seeded top-p sampling. `on_text` receives
        the text as it is produced. max_new_tokens 0 generates until EOS or a full cache; `ignore_eos` goes on past
        EOS until max_new_tokens or a full cache. `exact_boundary` finishes the prompt's last word from exact
        next-byte probabilities before generating tokens (a prompt ending mid-word or with a space).
        `cache_policy` (stop, sink-window, heavy-hitter), `cache_sinks`, `cache_pin_image`: what a full KV cache does
        (None: this Bundle's option, else the bundle's default; README "Cache policies").
        Raises RuntimeStatusError (IMAGE_INVALID, PROMPT_TOO_LONG, INVALID_ARGUMENT, INFERENCE_FAILED).
        """
        with Generator(self, image, prompt, max_new_tokens=max_new_tokens, raw_prompt=raw_prompt,
                       temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos,
                       exact_boundary=exact_boundary, channels=channels, cache_policy=cache_policy,
                       cache_sinks=cache_sinks, cache_pin_image=cache_pin_image) as gen:
            return self._drive(gen, on_text)

    def chat(self, image, channels: str | None = None) -> "Chat":
        """A conversation about `image`: `chat.ask(question)` answers; later questions are follow-ups that append to
        the KV cache without running the image through the vision graph again."""
        return Chat(self, image, channels)

    def _drive(self, gen: Generator, on_text) -> Result:
        """Runs `gen` to its end, streaming text to `on_text`; its Result."""
        stream = _call(capi.TokenizerStream_Create, self._live()) if on_text else None
        try:
            for token in gen:
                if stream is not None and len(gen.token_ids) == 1 and gen.boundary_text:
                    on_text(gen.boundary_text)
                if stream is not None:
                    delta = _call(capi.TokenizerStream_Decode, stream, token)
                    if delta:
                        on_text(delta)
            if stream is not None:
                rest = _call(capi.TokenizerStream_Flush, stream)
                if rest:
                    on_text(rest)
        finally:
            if stream is not None:
                capi.TokenizerStream_Destroy(stream)
        ids = gen.token_ids
        timings = gen.timings
        boundary = gen.boundary_text
        cache = gen.cache_stats
        return Result(
            token_ids=ids,
            text=boundary + self.decode(ids),
            stop_reason=gen.stop_reason,
            visual_tokens=gen.visual_tokens,
            prompt_tokens=len(gen.prompt_token_ids) - 1,
            cache_slots_used=gen.cache_length,
            ttft_s=timings["ttft_s"],
            decode_tokens_per_s=timings["decode_tokens_per_s"],
            timings=timings,
            boundary_text=boundary,
            backend=self.backend["backend"],
            cache_policy=cache["cache_policy"],
            evicted_slots=cache["evicted_slots"],
        )

    def close(self) -> None:
        self._finalize()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Chat:
    """A conversation about one image (Bundle.chat). The first `ask` runs vision and prefill; each later `ask`
    appends its question to the same KV cache (Generator.follow_up). A new image needs a new Chat."""

    def __init__(self, bundle: Bundle, image, channels: str | None = None):
        self._bundle, self._image, self._channels = bundle, image, channels
        self._gen: Generator | None = None
        self._fresh = False  # new_image was called: the next ask starts over on the same cache
        self.turns: list[Result] = []

    def ask(self, prompt: str, *, max_new_tokens: int = 32, raw_prompt: bool = False, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False, exact_boundary: bool = False,
            on_text: Callable[[str], None] | None = None) -> Result:
        """The answer to `prompt` (the chat template applied, unless `raw_prompt`); options as in Bundle.generate
        (`exact_boundary` on the first question only). Raises RuntimeStatusError (CACHE_FULL when the conversation
        no longer fits: start a new Chat)."""
        options = dict(max_new_tokens=max_new_tokens, raw_prompt=raw_prompt, temperature=temperature, top_p=top_p,
                       seed=seed, ignore_eos=ignore_eos)
        if self._gen is None:
            gen = Generator(self._bundle, self._image, prompt, channels=self._channels, exact_boundary=exact_boundary,
                            **options)
        elif self._fresh:  # a new image on the previous turn's cache
            cache = self._bundle._cache_options(cache_policy=None, cache_sinks=None, cache_pin_image=None)
            gen = self._gen.new_conversation(self._image, prompt, channels=self._channels,
                                             exact_boundary=exact_boundary, **options, **cache)
        elif exact_boundary:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "exact_boundary applies to a conversation's first question only")
        else:
            gen = self._gen.follow_up(prompt, **options)
        if self._gen is not None:
            self._gen.close()
        self._gen, self._fresh = gen, False
        result = self._bundle._drive(gen, on_text)
        self.turns.append(result)
        return result

    def new_image(self, image, channels: str | None = None) -> None:
        """Starts a new conversation about `image` on the same KV cache and buffers: the next `ask` runs the
        vision graph and prefill again, and the earlier turns are forgotten."""
        self._image, self._channels = image, channels
        self._fresh = True

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
