"""Exact prompt boundaries on the tiny twin: next-byte probabilities against a brute-force marginalisation.

The reference is built apart from the code under test: token bytes from transformers' own GPT-2
`bytes_to_unicode`, tokenizations enumerated as every split of the byte string into vocabulary pieces
(not a walk over the vocabulary), and every token probability from the *prefill* graph run on the
whole text (head + tokenization) through ONNX Runtime, not from the step graph over a cache.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from edgeprune_runtime import Bundle, RuntimeStatusError, Status
from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle
from edgeprune_runtime.tokenize import text_slots
from tiny_inputs import random_image

HEAD = "USER: <image>\nThe cat sits on the"


class BruteForce:
    """P(bytes) of the text after HEAD, by enumerating every tokenization and scoring it with the prefill graph."""

    def __init__(self, bundle: LoadedBundle, image, head: str):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.bundle = bundle
        tok = bundle.tokenizer
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        special = {t.content for t in tok.tokenizer.get_added_tokens_decoder().values()}
        vocab = tok.tokenizer.get_vocab()
        self.piece_id = {bytes(to_byte[c] for c in piece): i for piece, i in vocab.items() if piece not in special}
        self.byte_ids = np.array(sorted(self.piece_id.values()))
        self.before, self.after = tok.encode_prompt(head)
        gen = Generator(bundle, GeneratorParams(max_new_tokens=1), image, head, raw_prompt=True)
        # the visual slots of this image, from the runtime's vision graph (the LM is what is under test)
        from edgeprune_runtime.layout import layout_for
        from edgeprune_runtime.preprocess import load_image, preprocess

        pv, hw = preprocess(load_image(image), bundle.preprocess_params)
        layout = layout_for(hw, bundle.preprocess_params.image_grid_pinpoints, bundle.shapes)
        self.embeds, self.visual_valid, _ = bundle.engine.run_vision(pv, layout.feeds())
        assert gen.prompt_token_ids[:len(self.before)] == self.before
        self._memo: dict[tuple, np.ndarray] = {}

    def token_probs(self, seq: tuple) -> np.ndarray:
        """P(token | head + seq) over the tokens that have bytes, renormalised; from one prefill run."""
        if seq not in self._memo:
            s = self.bundle.shapes
            ids, valid = text_slots(self.before, self.after + list(seq), s.text_slots_before_image, s.text_slots_after_image)
            logits, *_ = self.bundle.engine.run_prefill(ids, valid, self.embeds, self.visual_valid)
            z = logits.astype(np.float64)[self.byte_ids]
            p = np.zeros(len(logits))
            p[self.byte_ids] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            self._memo[seq] = p
        return self._memo[seq]

    def splits(self, x: bytes):
        """Every tokenization of x exactly: each choice of cut points whose pieces are all vocabulary tokens."""
        for cuts in itertools.product((False, True), repeat=max(len(x) - 1, 0)):
            edges = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(x)]
            pieces = [x[a:b] for a, b in zip(edges, edges[1:])] if x else []
            if all(p in self.piece_id for p in pieces):
                yield tuple(self.piece_id[p] for p in pieces)

    def seq_prob(self, seq: tuple) -> float:
        p = 1.0
        for k in range(len(seq)):
            p *= self.token_probs(seq[:k])[seq[k]]
        return p

    def prefix_probability(self, y: bytes) -> float:
        """Sum over covers of y: a tokenization of y[:j] (j < len(y)) and one token whose bytes start with y[j:]."""
        if not y:
            return 1.0
        total = 0.0
        for j in range(len(y)):
            rest = y[j:]
            last = [i for piece, i in self.piece_id.items() if piece.startswith(rest)]
            for seq in self.splits(y[:j]):
                total += self.seq_prob(seq) * self.token_probs(seq)[last].sum()
        return total


@pytest.fixture(scope="module")
def loaded(tiny_bundles):
    return LoadedBundle(tiny_bundles[0.2])


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cam.png"
    random_image((60, 90), 4).save(path)
    return path


def exact_generator(loaded, image, prompt: str, **params) -> Generator:
    return Generator(loaded, GeneratorParams(exact_boundary=True, **params), image, prompt, raw_prompt=True)


@pytest.mark.parametrize("tail", [" ta", " ", " tab"])
def test_next_byte_probs_equal_brute_force(loaded, image, tail):
    gen = exact_generator(loaded, image, HEAD + tail)
    assert gen.tail == tail  # the last pre-token is what is marginalised
    ref = BruteForce(loaded, image, HEAD)
    x = tail.encode()
    expected = np.array([ref.prefix_probability(x + bytes([b])) for b in range(256)]) / ref.prefix_probability(x)
    got = gen.next_byte_probs()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert np.argmax(got) == np.argmax(expected)


@pytest.mark.parametrize("prompt,continuations", [
    (HEAD + " ta", [b"", b"b", b"bl", b"\xc3"]),  # \xc3: the first byte of a two-byte character
    (HEAD + " ", [b"", b"t", b"ta"]),
    ("USER: <image>\nWhat is in the picture? ASSISTANT:", [b"", b" "]),
])
def test_next_byte_probs_sum_to_one(loaded, image, prompt, continuations):
    gen = exact_generator(loaded, image, prompt)
    for c in continuations:
        p = gen.next_byte_probs(c)
        assert p.shape == (256,) and (p >= 0).all()
        assert abs(p.sum() - 1.0) < 1e-9, c


@pytest.mark.parametrize("tail,continuation", [(" ta", b"ble"), (" ", b"table"), (" tab", b"le ")])
def test_byte_by_byte_chains_to_the_sum_over_tokenizations(loaded, image, tail, continuation):
    """prod_i P(c_i | prompt c_<i) == P(c | prompt) summed over every tokenization of the tail and c (brute force)."""
    gen = exact_generator(loaded, image, HEAD + tail)
    chained = 1.0
    for i, b in enumerate(continuation):
        chained *= gen.next_byte_probs(continuation[:i])[b]
    ref = BruteForce(loaded, image, HEAD)
    x = tail.encode()
    expected = ref.prefix_probability(x + continuation) / ref.prefix_probability(x)
    assert chained == pytest.approx(expected, rel=1e-4)
    assert gen.byte_probability(continuation) == pytest.approx(chained, rel=1e-9)


def test_greedy_exact_boundary_follows_the_most_likely_bytes(loaded, image):
    prompt = HEAD + " ta"
    probe = exact_generator(loaded, image, prompt)
    gen = exact_generator(loaded, image, prompt, max_new_tokens=4)
    while not gen.done:
        gen.generate_next_token()
    word = gen.boundary_text.encode()
    for i in range(len(word)):  # each byte chosen byte by byte is the argmax of the exact distribution
        assert int(np.argmax(probe.next_byte_probs(word[:i]))) == word[i]
    # the byte after the word starts a new pre-token and is the first byte of the first token
    after = int(np.argmax(probe.next_byte_probs(word)))
    first = loaded.tokenizer.tokenizer.id_to_token(gen.token_ids[0])
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert bytes_to_unicode()[after] == first[0]
    with pytest.raises(RuntimeStatusError) as e:
        gen.next_byte_probs()
    assert e.value.status == Status.INVALID_ARGUMENT and "before the first" in e.value.message


def test_api_and_json(tiny_bundles, image):
    with Bundle(tiny_bundles[0.2]) as bundle:
        p = bundle.next_byte_probs(image, HEAD + " ta", raw_prompt=True)
        assert abs(p.sum() - 1) < 1e-9
        pieces = []
        r = bundle.generate(image, HEAD + " ta", raw_prompt=True, exact_boundary=True, max_new_tokens=3,
                            on_text=pieces.append)
        assert r.text == r.boundary_text + bundle.decode(r.token_ids) == "".join(pieces)
        assert r.boundary_text and json.loads(json.dumps(r.to_dict()))["boundary_text"] == r.boundary_text
        plain = bundle.generator(image, HEAD + " ta", raw_prompt=True)
        with pytest.raises(RuntimeStatusError) as e:
            plain.next_byte_probs()
        assert e.value.status == Status.INVALID_ARGUMENT and "exact_boundary" in e.value.message
        plain.close()


def test_both_command_lines(tiny_bundles, image):
    import subprocess
    import sys
    from pathlib import Path

    args = [str(tiny_bundles[0.2]), "--image", str(image), "--prompt", HEAD + " ta", "--raw-prompt", "--json",
            "--exact-boundary", "--ignore-eos", "--max-new-tokens", "6"]
    ours = subprocess.run([str(Path(sys.executable).parent / "edgeprune"), "run", *args], capture_output=True, text=True)
    alone = subprocess.run([sys.executable, "-m", "edgeprune_runtime", *args], capture_output=True, text=True)
    assert ours.returncode == alone.returncode == 0, ours.stderr + alone.stderr
    a, b = json.loads(ours.stdout), json.loads(alone.stdout)
    assert a["token_ids"] == b["token_ids"] and a["boundary_text"] == b["boundary_text"] != ""
    assert len(a["token_ids"]) == 6 and a["stop_reason"] == "max_new_tokens"


def test_token_healing_baseline(loaded, image):
    """Token healing equals the exact distribution when the tail is one one-byte token (its covers are exactly
    the tokens starting with that byte), and differs from it for a tail of several tokens."""
    from edgeprune_runtime.byteprobs import naive_next_byte_probs, token_healing_next_byte_probs

    tok = loaded.tokenizer.tokenizer
    for tail, same in ((" ", True), (" ta", False)):
        gen = exact_generator(loaded, image, HEAD + tail)
        exact = gen.next_byte_probs()
        ids = tuple(tok.encode(tail, add_special_tokens=False).ids)
        healed = token_healing_next_byte_probs(gen._byte_model, ids)
        naive = naive_next_byte_probs(gen._byte_model, ids)
        assert abs(healed.sum() - 1) < 1e-9 and abs(naive.sum() - 1) < 1e-9
        assert np.allclose(healed, exact, atol=1e-12) == same


class ForcedBytes:
    """A stand-in byte model that puts all the mass on the given bytes, in order: the bytes a test wants chosen."""

    def __init__(self, model, tail: bytes, forced: bytes):
        self.table, self.tail, self.forced = model.table, tail, forced

    def next_byte_probs(self, x: bytes) -> np.ndarray:
        p = np.zeros(256)
        p[self.forced[len(x) - len(self.tail)]] = 1.0
        return p


@pytest.mark.parametrize("end, forced", [(" ", b" t"), ("\n", b" A")])
def test_a_whitespace_run_gives_its_last_space_to_the_next_word(loaded, image, end, forced):
    """GPT-2's pre-tokenizer splits "  t" as [" ", " t"] and "\\n A" as ["\\n", " A"]: the cache must hold the
    canonical tokens up to the last piece's start and the first token must start with " t" / " A", so that the
    whole text's tokenization (the tokenizers library, on the text) is what the model was conditioned on."""
    prompt = HEAD + end
    gen = exact_generator(loaded, image, prompt, max_new_tokens=1)
    assert gen.tail == end
    gen._byte_model = ForcedBytes(gen._byte_model, end.encode(), forced)
    gen.generate_next_token()
    first = loaded.tokenizer.tokenizer.decode([gen.token_ids[0]])
    assert first.startswith(forced.decode()), first
    before, after = loaded.tokenizer.encode_prompt(prompt + gen.boundary_text + first)
    assert gen._context_ids + gen.token_ids == before + [loaded.tokenizer.image_token_id] + after
    assert gen.boundary_text == ""  # the chosen space went to the first token, not to the word before it


def test_a_failed_boundary_step_can_be_retried(loaded, image, monkeypatch):
    """A step that fails while the finished word is written (INFERENCE_FAILED) leaves the generator as it was:
    the retry gives the tokens of a run that never failed (it used to sample from the head's logits, tail lost)."""
    from edgeprune_runtime import generator

    expected = exact_generator(loaded, image, HEAD + " ta", max_new_tokens=3)
    while not expected.done:
        expected.generate_next_token()
    gen = exact_generator(loaded, image, HEAD + " ta", max_new_tokens=3)
    real, failed = generator.append_slots, []

    def fail_once(*args):
        if not failed:
            failed.append(True)
            raise RuntimeStatusError(Status.INFERENCE_FAILED, "injected")
        return real(*args)

    monkeypatch.setattr(generator, "append_slots", fail_once)
    with pytest.raises(RuntimeStatusError):
        gen.generate_next_token()
    while not gen.done:
        gen.generate_next_token()
    assert failed and gen.boundary_text == expected.boundary_text != ""
    assert gen.token_ids == expected.token_ids and gen._context_ids == expected._context_ids


def test_the_boundary_word_has_its_cache_slots_reserved(loaded, image):
    """The word finished byte by byte can take up to MAX_BOUNDARY_TOKENS tokens where the tail had fewer:
    max_new_tokens that fits the prompt alone is refused up front, not met as CACHE_FULL mid-answer."""
    from edgeprune_runtime.byteprobs import MAX_BOUNDARY_TOKENS

    prompt = HEAD + " ta"
    plain = Generator(loaded, GeneratorParams(max_new_tokens=1), image, prompt, raw_prompt=True)
    room = loaded.shapes.cache_capacity - plain.prompt_slots  # every slot after the whole prompt's tokens
    with pytest.raises(RuntimeStatusError) as e:
        exact_generator(loaded, image, prompt, max_new_tokens=room)
    assert e.value.status == Status.INVALID_ARGUMENT and "exact boundary" in e.value.message
    tail_tokens = len(loaded.tokenizer.tokenizer.encode(" ta", add_special_tokens=False).ids)
    m = room + tail_tokens - MAX_BOUNDARY_TOKENS
    gen = exact_generator(loaded, image, prompt, max_new_tokens=m, ignore_eos=True)
    while not gen.done:
        gen.generate_next_token()
    assert gen.stop_reason == "max_new_tokens" and len(gen.token_ids) == m


def test_continuations_past_the_boundary_limit_are_refused(loaded, image):
    """tail + continuation is bounded (12 bytes): a longer one is one INVALID_ARGUMENT line naming the limit, before
    any scoring; up to the limit the probabilities are there (the memo holds float32 rows)."""
    gen = exact_generator(loaded, image, HEAD + " ta")  # tail " ta": 3 bytes
    for call in (gen.next_byte_probs, gen.byte_probability):
        with pytest.raises(RuntimeStatusError) as e:
            call(b"b" * 10)
        assert e.value.status == Status.INVALID_ARGUMENT and "at most 12" in e.value.message
    assert gen._byte_model.calls == 0  # refused before any step
    assert abs(gen.next_byte_probs(b"ble le").sum() - 1) < 1e-9 and 0 < gen.byte_probability(b"ble le") < 1
    assert {p.dtype for p in gen._byte_model._memo.values()} == {np.dtype(np.float32)}
