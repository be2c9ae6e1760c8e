"""One request: image + prompt -> vision -> prefill -> token-by-token decode over the fixed cache.

Plain Python objects that raise RuntimeStatusError; `capi.py` turns them into handles and statuses.

    LoadedBundle(path)                      manifest + tokenizer + preprocessing + Engine (sessions)
    Generator(bundle, params, image, ...)   runs vision and prefill; then
        while not g.done: g.generate_next_token()
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from edgeprune_runtime import budget, byteprobs, cache_policy, checks, ortlib
from edgeprune_runtime.backends.device import HOST
from edgeprune_runtime.backends.select import CPU, open_with
from edgeprune_runtime.engine import Engine
from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.kvcache import prefill_slot_valid
from edgeprune_runtime.layout import layout_for, max_newline_rows
from edgeprune_runtime.manifest import Manifest, load_manifest
from edgeprune_runtime.sampling import Sampler, check_sampling
from edgeprune_runtime.step import append_slots, step_runner
from edgeprune_runtime.tokenize import PromptTokenizer, text_slots

STOP_EOS = "eos"
STOP_MAX_NEW_TOKENS = "max_new_tokens"
STOP_CACHE_FULL = "cache_full"


class LoadedBundle:
    """Everything a request needs that does not change between requests."""

    def __init__(self, path: str | os.PathLike, verify_hashes: bool = True, with_engine: bool = True,
                 memory_budget_mb: int | None = None, max_image_pixels: int | None = None, backend: str = "auto"):
        """`with_engine=False` skips the ONNX Runtime sessions (tools that only need preprocessing and
        the tokenizer, such as the toolchain's compare, which runs the graphs itself). `backend`: auto, cpu, cuda
        or trt (backends/select.py); `self.backend` is the one chosen, with the reason.

        The memory budget and image pixel limit come from the arguments, else the environment (budget.py).
        Raises RuntimeStatusError: INVALID_ARGUMENT (bad path type or option), BUNDLE_INVALID, RESOURCE_LIMIT
        (the bundle's static sizes need more than the budget: checked before any request buffer exists),
        DEVICE_UNSUPPORTED / DEPENDENCY_MISSING (the backend asked for cannot run here, saying why)."""
        from edgeprune_runtime.preprocess import PreprocessParams

        if with_engine:
            ortlib.onnxruntime()  # DEPENDENCY_MISSING naming the install command, before any work
        self.limits = budget.limits(memory_budget_mb, max_image_pixels)
        self.manifest: Manifest = load_manifest(path, verify_hashes=verify_hashes)
        m, s = self.manifest, self.manifest.shapes
        pp = self.preprocess_params = PreprocessParams.from_dict(m.preprocess)
        newline_rows = max_newline_rows(pp.image_grid_pinpoints, pp.crop_size, s.patch_grid)
        for ok, rule in ((pp.crop_size == s.crop_size, "preprocess.crop_size == shapes.crop_size"),
                         (pp.partitions == s.partitions, "preprocess.partitions == shapes.partitions"),
                         (s.newline_slots in (0, newline_rows), f"shapes.newline_slots is 0 or {newline_rows} (the "
                                                                "stitched rows of the largest pinpoint)")):
            if not ok:
                raise RuntimeStatusError(Status.BUNDLE_INVALID, f"manifest breaks the rule {rule}; re-export the bundle")
        tok = m.tokenizer  # its fields were checked by load_manifest
        self.tokenizer = PromptTokenizer.from_file(
            m.path(tok["file"], "tokenizer.file"), tok["image_token"], tok["image_token_id"], tok["eos_token_ids"],
            s.text_slots_before_image, s.text_slots_after_image, s.vocab_size)
        self.prompt_template = m.data["prompt_template"]
        self.backend, self.engine = open_with(backend, m, lambda b: Engine(m, b)) if with_engine else (CPU, None)
        self.cache_info = m.cache  # the default cache policy and what eviction needs (cache_policy.BundleCache)
        cache_itemsize = np.dtype(self.engine.cache_dtype).itemsize if self.engine else 4
        self.request_bytes = budget.check_request(budget.request_bytes(s, pp, cache_itemsize), self.limits)

    @property
    def shapes(self):
        return self.manifest.shapes


@dataclass
class GeneratorParams:
    max_new_tokens: int = 32  # 0: until EOS or the cache is full
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens (EOS is still sampled, not a stop)
    exact_boundary: bool = False  # the prompt's last word is continued byte by byte (byteprobs.py) before tokens
    # when the cache is full (cache_policy.py); None: the bundle's default. A conversation keeps its first turn's.
    cache_policy: str | None = None  # stop | sink-window | heavy-hitter
    cache_sinks: int | None = None  # first slots never evicted
    cache_pin_image: bool | None = None  # heavy-hitter: never evict the image's slots

    def check(self) -> None:
        if not (isinstance(self.max_new_tokens, (int, np.integer)) and not isinstance(self.max_new_tokens, (bool, np.bool_))
                and self.max_new_tokens >= 0):
            raise RuntimeStatusError(Status.INVALID_ARGUMENT,
                                     f"max_new_tokens must be an integer >= 0 (0 = until EOS or cache full), got {checks.show(self.max_new_tokens)}")
        check_sampling(self.temperature, self.top_p, self.seed)
        for name in ("ignore_eos", "exact_boundary"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{name} must be a bool, got {checks.show(getattr(self, name))}")
        if self.cache_policy is not None:
            cache_policy.check_policy_name(self.cache_policy, "--cache-policy")
        if self.cache_sinks is not None:
            cache_policy.check_sinks(self.cache_sinks, 1 << 62)  # below the capacity: checked against the bundle
        if self.cache_pin_image is not None and not isinstance(self.cache_pin_image, (bool, np.bool_)):
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"cache_pin_image must be a bool, got {checks.show(self.cache_pin_image)}")


@dataclass
class Timings:
    """Seconds spent inside runtime calls (time the caller spends between calls is not counted)."""

    image_s: float = 0.0  # load + decode the image file
    preprocess_s: float = 0.0  # anyres pixel values + layout
    vision_s: float = 0.0
    prefill_s: float = 0.0  # prefill graph + cache fill
    ttft_s: float = 0.0  # Generator creation + the call that produced the first token
    decode_s: float = 0.0  # every later GenerateNextToken call
    tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """(tokens - 1) / decode_s; None when fewer than two tokens were generated."""
        if self.tokens < 2 or self.decode_s <= 0:
            return None
        return (self.tokens - 1) / self.decode_s

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("image_s", "preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_s",
                                               "tokens")} | {"decode_tokens_per_s": self.decode_tokens_per_s}


class Generator:
    """Runs vision and prefill at construction; each `generate_next_token` then yields one token id."""

    def __init__(self, bundle: LoadedBundle, params: GeneratorParams, image, prompt: str, raw_prompt: bool = False,
                 channels: str | None = None, reuse: "Generator | None" = None):
        """`image`: a path, encoded bytes, a PIL image, or a numpy uint8 [H, W, 3] frame with `channels`
        ("rgb" or "bgr"; required for frames, refused otherwise). See `_load`.

        `reuse`: a done generator of the same bundle whose KV cache and decode binding this one takes over (a new
        conversation without allocating buffers); it can then be read but not stepped."""
        t0 = time.perf_counter()
        _check_raw_prompt(raw_prompt)
        params.check()
        if reuse is not None:
            reuse._check_hand_over(bundle)
        self.bundle = bundle
        self.params = GeneratorParams(**params.__dict__)  # a snapshot: later changes to params do not leak in
        s = bundle.shapes
        tok = bundle.tokenizer
        engine = bundle.engine
        p = self.params
        self.policy = bundle.cache_info.resolve(p.cache_policy, p.cache_sinks, p.cache_pin_image, s.cache_capacity,
                                                engine.per_layer_valid, engine.device is HOST)
        _check_ends(self.policy, p)

        text = tok.prompt_text(prompt, bundle.prompt_template, raw_prompt)
        before, after = tok.encode_prompt(text)  # prompt errors surface before any heavy work
        self.prompt_token_ids = before + [tok.image_token_id] + after
        self.tail = ""  # exact boundary: the prompt's last pre-token, left out of the prefill (byteprobs.py)
        self.boundary_text = ""  # exact boundary: the text chosen byte by byte before the first token
        tail_tokens = 0
        if self.params.exact_boundary:
            table = byteprobs.token_bytes(bundle)  # INVALID_ARGUMENT for a tokenizer that is not byte-level
            self._step = step_runner(bundle)  # INVALID_ARGUMENT for a bundle without a step graph
            head, self.tail = byteprobs.split_tail(tok.tokenizer, text, tok.image_token)
            head_before, head_after = tok.encode_prompt(head)
            tail_tokens = len(before) + len(after) - len(head_before) - len(head_after)
            before, after = head_before, head_after
        self._context_ids = before + [tok.image_token_id] + after  # what the cache holds, in order (follow_up)

        self.timings = Timings()
        # what is left of the budget for the image once the bundle's own buffers are counted
        image_budget = bundle.limits.memory_bytes - bundle.request_bytes
        t = time.perf_counter()
        img = _load(image, channels, bundle.limits.image_pixels, image_budget)
        self.timings.image_s = time.perf_counter() - t

        from edgeprune_runtime.preprocess import preprocess

        t = time.perf_counter()
        pixel_values, image_hw = preprocess(img, bundle.preprocess_params, max_pixels=bundle.limits.image_pixels,
                                            max_bytes=image_budget)
        pp = bundle.preprocess_params
        try:
            layout = layout_for(image_hw, pp.image_grid_pinpoints, s)
        except ValueError as e:
            raise RuntimeStatusError(Status.BUNDLE_INVALID, f"bundle shapes do not fit its preprocessing: {e}; re-export") from None
        self.timings.preprocess_s = time.perf_counter() - t

        t = time.perf_counter()
        embeds, visual_valid, self.visual_source = engine.run_vision(pixel_values, layout.feeds())
        self.timings.vision_s = time.perf_counter() - t
        self.visual_tokens = int(round(float(visual_valid.sum())))

        t1, t2 = s.text_slots_before_image, s.text_slots_after_image
        text_ids, text_valid = text_slots(before, after, t1, t2)
        slot_valid = prefill_slot_valid(text_valid, visual_valid, t1)
        in_cache = int((slot_valid > 0.5).sum())  # the prefill's tokens (the tail is not among them)
        self.prompt_slots = in_cache + tail_tokens
        m = self.params.max_new_tokens
        # exact boundary: the finished word's tokens replace the tail's, at most one per byte of the word, so the
        # worst case is reserved (then the boundary's append always fits, whatever the bytes chosen)
        boundary = byteprobs.MAX_BOUNDARY_TOKENS if self.params.exact_boundary else 0
        # Layer l holds the text tokens and at most V_l visual ones (the valid visual slots win the drop's TopK).
        visual = int((visual_valid > 0.5).sum())
        held = [in_cache + boundary - visual + min(visual, s.visual_slots_at(i)) for i in range(s.num_layers)]
        worst = max(range(s.num_layers), key=lambda i: held[i] - s.cache_slots_at(i))
        if self.policy.evicts:
            m = 0  # generation goes on past the capacity; only the prompt (and boundary) must fit
        if (m or boundary) and held[worst] + m > s.cache_slots_at(worst):
            where = f" in layer {worst}" if s.drops_visual else ""
            word = f", up to {boundary} of them for the exact boundary's last word" if boundary else ""
            raise RuntimeStatusError(
                Status.INVALID_ARGUMENT,
                f"--max-new-tokens {m} needs {held[worst] + m} cache slots{where} ({held[worst]} prompt{word} + {m} new), "
                f"the bundle has {s.cache_slots_at(worst)}; lower it or raise `shapes.new_token_slots` in the recipe "
                "and re-export",
            )

        t = time.perf_counter()
        # reuse: the same cache buffers; the prefill overwrites each layer's slots 0..n-1 and marks the rest invalid
        logits, self.cache = engine.start(text_ids, text_valid, embeds, visual_valid,
                                          cache=None if reuse is None else reuse.cache)
        if reuse is not None:
            reuse._handed_over = True
        evictor = None
        if self.policy.evicts:  # the image's slots follow the valid text slots before it (prefill order, compacted)
            image_slots = (int((text_valid[:t1] > 0.5).sum()), visual)
            evictor = cache_policy.Evictor(self.policy, self.cache, bundle.cache_info.inv_freq, image_slots)
        # small: logits and one slot's K/V; its decode count starts at 0
        self.decoder = engine.decoder(self.cache, evictor)
        self.timings.prefill_s = time.perf_counter() - t

        self.logits = logits  # [vocab], of the last prompt token until the first decode step
        self._byte_model = None
        if self.params.exact_boundary:
            head_logits = self._head_logits = logits.copy()
            self._byte_model = byteprobs.ByteModel(
                table, lambda seq: head_logits if not seq else self._step.run(seq, self.cache)[0])
        self.sampler = Sampler(self.params.temperature, self.params.top_p, self.params.seed)
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None
        self._eos = set(tok.eos_token_ids)
        self._handed_over = False  # a follow-up turn took the cache (follow_up)
        self.timings.ttft_s = time.perf_counter() - t0

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def evicted_slots(self) -> int:
        """Cache slots evicted so far in this conversation (0 under the stop policy)."""
        return self.decoder.evictor.evicted if self.decoder.evictor is not None else 0

    def generate_next_token(self) -> int:
        """Samples the next token (running one decode step except for the first token) and returns it.

        Raises RuntimeStatusError(CACHE_FULL) when generation stopped at a full cache, INVALID_ARGUMENT
        when it stopped for another reason.
        """
        if self._handed_over:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this turn has a follow-up, which owns the cache now")
        if self.stop_reason == STOP_CACHE_FULL:
            raise RuntimeStatusError(Status.CACHE_FULL, f"the KV cache is full ({self.cache.capacity} slots); "
                                     "raise `shapes.new_token_slots` in the recipe and re-export for longer answers")
        if self.done:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT,
                                     f"generation is done (stop reason: {self.stop_reason}); create a new generator")
        t = time.perf_counter()
        if self.token_ids:
            self.logits = self.decoder.step(self.token_ids[-1])
        elif self._byte_model is not None:
            self._finish_boundary()
        token = self.sampler(self.logits)
        self.token_ids.append(token)
        self.timings.tokens = len(self.token_ids)
        if token in self._eos and not self.params.ignore_eos:
            self.stop_reason = STOP_EOS
        elif len(self.token_ids) == self.params.max_new_tokens:
            self.stop_reason = STOP_MAX_NEW_TOKENS
        elif self.cache.full and self.decoder.evictor is None:  # no slot left for this token's K/V, no policy to make one
            self.stop_reason = STOP_CACHE_FULL
        dt = time.perf_counter() - t
        if len(self.token_ids) == 1:
            self.timings.ttft_s += dt
        else:
            self.timings.decode_s += dt
        return token

    def follow_up(self, prompt: str, params: GeneratorParams, raw_prompt: bool = False) -> "Generator":
        """The next turn of this conversation: a new Generator that owns this one's KV cache, with the follow-up
        question appended by one step-graph call (no vision graph, no prefill of earlier turns).

        What the cache then holds is the conversation as the chat template writes it: this turn's prompt, its
        answer (without a final EOS, which the template does not write) and `follow_up_text(prompt)`. This
        generator must be done; afterwards it can still be read but not stepped (its cache moved on).
        Raises RuntimeStatusError: INVALID_ARGUMENT (not done, handed over already, bad prompt or params, a turn
        that would never end: max_new_tokens 0 with ignore_eos under an evicting policy),
        PROMPT_TOO_LONG, CACHE_FULL (the follow-up does not fit: under the stop policy; an evicting policy evicts to
        make room and fails only when pinned slots leave too few), INFERENCE_FAILED."""
        t0 = time.perf_counter()
        _check_raw_prompt(raw_prompt)
        params.check()
        self._check_hand_over(self.bundle)
        if params.exact_boundary:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "exact_boundary applies to a conversation's first turn only")
        bundle, tok = self.bundle, self.bundle.tokenizer
        text = follow_up_text(tok, bundle.prompt_template, prompt, raw_prompt)
        ids = _encode_follow_up(tok, text)
        # the answer's last token was sampled, never run: its K/V is not in the cache yet (a final EOS stays out)
        pending = self.token_ids[-1:] if self.stop_reason != STOP_EOS else []
        runner = step_runner(bundle)
        new = pending + ids
        if len(new) > runner.max_slots:
            raise RuntimeStatusError(Status.PROMPT_TOO_LONG, f"the follow-up needs {len(new)} slots, a step takes at most "
                                     f"{runner.max_slots}; shorten it")
        _check_ends(self.policy, params)  # a follow-up keeps the conversation's policy
        evictor = self.decoder.evictor
        if evictor is not None:
            evictor.make_room(len(new))  # the conversation's policy makes room for the new turn; CACHE_FULL if pinned
        elif len(new) + params.max_new_tokens > self.cache.room():
            raise RuntimeStatusError(Status.CACHE_FULL, f"the follow-up needs {len(new)} cache slots + "
                                     f"{params.max_new_tokens} new, {self.cache.room()} are left of "
                                     f"{self.cache.capacity}; start a new conversation or raise `shapes.new_token_slots` "
                                     "and re-export")
        turn = Generator.__new__(Generator)
        turn.bundle, turn.params = bundle, GeneratorParams(**params.__dict__)
        turn.policy = self.policy  # a conversation keeps its first turn's policy (and evictor, with the decoder)
        # the conversation's ids as the cache holds them; the image token stands for the visual slots
        turn._context_ids = turn.prompt_token_ids = self._context_ids + self.token_ids[:len(self.token_ids) - 1] + new
        turn.tail, turn.boundary_text, turn._byte_model = "", "", None
        turn.visual_tokens, turn.visual_source = self.visual_tokens, self.visual_source
        turn.timings = Timings()
        t = time.perf_counter()
        # heavy-hitter: the question's attention counts toward the mass as decode steps' does (H2O: every query's)
        mass = np.zeros(self.cache.capacity, np.float32) if evictor is not None and evictor.needs_mass else None
        logits, keys, values = runner.run(new, self.cache, mass_out=mass)
        if mass is not None:
            evictor.observe(mass)  # before the append: the new slots have received no attention yet
        append_slots(self.cache, keys, values)
        turn.timings.prefill_s = time.perf_counter() - t  # vision_s stays 0: the image is in the cache already
        turn.cache, turn.decoder = self.cache, self.decoder
        self.logits = self.logits.copy()  # it may be the decoder's buffer, which the new turn's steps overwrite
        turn.prompt_slots = self.cache.length
        turn.logits = logits
        turn.sampler = Sampler(turn.params.temperature, turn.params.top_p, turn.params.seed)
        turn.token_ids, turn.stop_reason, turn._eos = [], None, self._eos
        turn._handed_over = False
        self._handed_over = True
        turn.timings.ttft_s = time.perf_counter() - t0
        return turn

    def _check_hand_over(self, bundle: LoadedBundle) -> None:
        """INVALID_ARGUMENT unless this generator may give its cache to a follow-up or a new conversation."""
        if bundle is not self.bundle:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "a generator's cache can only be reused by its own bundle")
        if not self.done:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "finish this turn (until the generator is done) before a "
                                     "follow-up or a new conversation on its cache")
        if self._handed_over:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this turn's cache was handed over already; use the latest turn")

    def next_byte_probs(self, continuation: bytes = b"") -> np.ndarray:
        """P(next byte | prompt + continuation), float64 [256] summing to 1, exact over the tokenizations of the
        prompt's last word (byteprobs.py). Only for a generator made with exact_boundary, before its first token."""
        return self._boundary_model().next_byte_probs(self._boundary_bytes(continuation))

    def byte_probability(self, continuation: bytes) -> float:
        """P(the answer starts with the bytes `continuation` | prompt), summed over all their tokenizations."""
        model, x = self._boundary_model(), self._boundary_bytes(continuation)
        return model.prefix_probability(x) / model.prefix_probability(self.tail.encode("utf-8"))

    def _boundary_bytes(self, continuation) -> bytes:
        """tail + continuation; INVALID_ARGUMENT beyond MAX_BOUNDARY_BYTES (the scored tokenizations, and their memo,
        grow with every byte)."""
        x = self.tail.encode("utf-8") + _as_bytes(continuation)
        if len(x) > byteprobs.MAX_BOUNDARY_BYTES:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"the prompt's last word and the continuation have {len(x)} "
                                     f"bytes, next-byte probabilities take at most {byteprobs.MAX_BOUNDARY_BYTES}; shorten the continuation")
        return x

    def _boundary_model(self) -> byteprobs.ByteModel:
        if not self.params.exact_boundary:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "next-byte probabilities need a generator made with "
                                     "exact_boundary=True (--exact-boundary)")
        if self._byte_model is None:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "next-byte probabilities are for the prompt: ask "
                                     "before the first GenerateNextToken")
        return self._byte_model

    def _finish_boundary(self) -> None:
        """Chooses the bytes that finish the prompt's last word from the exact next-byte probabilities, until a
        byte would start a new pre-token (or MAX_BOUNDARY_BYTES); then writes the canonical tokens of that word
        into the cache with one step, so token-by-token decoding goes on from a pre-token boundary, where the
        one canonical tokenization is the right condition.

        The new pre-token starts where the pre-tokenizer's last piece starts, which is not always at the byte just
        chosen: GPT-2's `\\s+(?!\\S)` gives a run of spaces' last space to the next word ("  t" -> " ", " t"). The
        cache then gets the word up to that start, and the first token must start with the bytes from it on.
        The byte model is kept until the cache holds the word: a failed step can be retried with the same state."""
        tok = self.bundle.tokenizer.tokenizer
        model = self._byte_model
        tail = self.tail.encode("utf-8")
        chosen = b""
        while len(tail + chosen) < byteprobs.MAX_BOUNDARY_BYTES or not byteprobs.is_utf8_prefix_complete(tail + chosen):
            probs = model.next_byte_probs(tail + chosen)
            byte = self.sampler(np.log(np.maximum(probs, 1e-300)))  # finite log-probabilities: bytes of mass 0 never win
            word = tail + chosen + bytes([byte])
            if byteprobs.is_utf8_prefix_complete(word):
                text = word.decode("utf-8")
                pieces = tok.pre_tokenizer.pre_tokenize_str(text)
                if len(pieces) > 1:  # the word is complete, tokens take over from the last piece's start
                    cut = len(text[:pieces[-1][1][0]].encode("utf-8"))  # offsets are in characters
                    break
            chosen += bytes([byte])
        else:
            word, cut = tail + chosen, len(tail + chosen)  # the word reached MAX_BOUNDARY_BYTES: the first token is free
        # rest: the bytes the first token must start with (b"" = any token). A cut inside the tail (a prompt ending in
        # two spaces, then a letter) gives the prompt's last space to the first token, whose text then repeats it.
        head, rest = word[:cut], word[cut:]
        ids = tok.encode(head.decode("utf-8", errors="replace"), add_special_tokens=False).ids if head else []
        logits = self._head_logits
        if ids:
            logits, keys, values = self._step.run(ids, self.cache)
            append_slots(self.cache, keys, values)  # fits: Generator() reserved MAX_BOUNDARY_TOKENS slots
            self._context_ids = self._context_ids + ids
        self._byte_model = None
        self.boundary_text = head[len(tail):].decode("utf-8", errors="replace")
        self.logits = logits
        if rest:
            # P(token | word, rest) is the token distribution restricted to the tokens whose bytes start with `rest`
            # (the canonical first token of the next pre-token covers what was chosen of it)
            table = model.table
            keep = [i for i in table.by_first[rest[0]] if table.of[i].startswith(rest)] or list(table.by_first[rest[0]])
            self.logits = np.full_like(logits, -1e30)  # finite: the sampler refuses -inf as a broken graph
            self.logits[keep] = logits[keep]


def _check_ends(policy: cache_policy.CachePolicy, params: GeneratorParams) -> None:
    """INVALID_ARGUMENT for a turn that would never stop: an evicting policy never fills the cache, so with
    ignore_eos only max_new_tokens can end it (a first turn and a follow-up alike)."""
    if policy.evicts and params.max_new_tokens == 0 and params.ignore_eos:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--cache-policy {policy.name} never fills the cache: "
                                 "with --ignore-eos, give --max-new-tokens N > 0")


def follow_up_template(prompt_template: str, image_token: str) -> str:
    """The text a follow-up question adds after an answer: " " + the prompt template without its image.

    LLaVA's vicuna chat template (the twins', LLaVA-1.6-vicuna's) writes an assistant turn as
    "ASSISTANT: " + answer + " " and a user turn as "USER: " + text + " ", then "ASSISTANT:"; the bundle's
    template is the first user turn with "<image>\n" in it (tests/test_multi_turn.py checks this against
    transformers' apply_chat_template)."""
    return " " + prompt_template.replace(image_token + "\n", "").replace(image_token, "")


def follow_up_text(tok, prompt_template: str, prompt: str, raw: bool) -> str:
    """The follow-up's text: the template around `prompt`, or `prompt` itself when `raw` (then without an image token)."""
    from edgeprune_runtime.tokenize import apply_template

    if not isinstance(prompt, str):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"prompt must be a str, got {type(prompt).__name__}")
    if tok.image_token in prompt:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"a follow-up cannot contain {tok.image_token!r}: the "
                                 "conversation's image is in the cache already; start a new conversation for a new image")
    return prompt if raw else apply_template(follow_up_template(prompt_template, tok.image_token), prompt)


def _encode_follow_up(tok, text: str) -> list[int]:
    """Token ids of a follow-up's text, without BOS (the conversation has one)."""
    if len(text) > MAX_FOLLOW_UP_CHARS:
        raise RuntimeStatusError(Status.PROMPT_TOO_LONG, f"the follow-up has {len(text)} characters; shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, "the follow-up is not valid UTF-8 text") from None
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, "the follow-up is empty")
    return ids


MAX_FOLLOW_UP_CHARS = 1 << 16


def _check_raw_prompt(raw_prompt) -> None:
    """A first turn and a follow-up take the same raw_prompt values: a Python or numpy bool."""
    if not isinstance(raw_prompt, (bool, np.bool_)):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"raw_prompt must be a bool, got {type(raw_prompt).__name__}")


def _as_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"a continuation must be bytes or str, got {type(value).__name__}")


def _load(image, channels: str | None, max_pixels: int, max_bytes: int):
    """The request's image as a PIL image, each kind through the one path that gives the same pixels:
    a path (str / PathLike) and encoded bytes are decoded by the bundle's loader, a numpy frame is copied
    in RGB order (`channels` says which order it has), a PIL image is used as it is (preprocess checks
    its size and converts its mode). Raises RuntimeStatusError (INVALID_ARGUMENT, IMAGE_INVALID, RESOURCE_LIMIT)."""
    from PIL import Image

    from edgeprune_runtime.preprocess import image_from_array, load_image, load_image_bytes

    if isinstance(image, np.ndarray):
        if channels is None:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "a numpy frame needs channels='rgb' or channels='bgr' "
                                     "(OpenCV's frames are BGR)")
        return image_from_array(image, channels, max_pixels=max_pixels, max_bytes=max_bytes)
    if channels is not None:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"channels={checks.show(channels)} applies to numpy frames "
                                 f"only; leave it out for a {type(image).__name__}")
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels=max_pixels, max_bytes=max_bytes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_image_bytes(image, max_pixels=max_pixels, max_bytes=max_bytes)
    raise RuntimeStatusError(Status.INVALID_ARGUMENT, "image must be a file path, encoded image bytes, a PIL image or "
                             f"a numpy uint8 [H, W, 3] frame, got {type(image).__name__}")
