"""One loaded bundle, many threads: shared bundle handles, one thread per Generator at a time, misuse gets statuses."""

import threading

import pytest

from edgeprune_runtime import Bundle, capi
from edgeprune_runtime.capi import Out
from edgeprune_runtime.errors import Status

PROMPTS = ["What is in the picture?", "Is there a dog?", "What color is the car?", "Where is the ball?", "Describe it."]


@pytest.fixture
def handles(capi_handles):
    return capi_handles(max_new_tokens=6)


def _run_all(fn, n):
    errors = []

    def wrap(i):
        try:
            fn(i)
        except BaseException as e:  # reported to the main thread, where pytest sees it
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_sharing_a_bundle_get_the_single_threaded_tokens(fake_bundle, images):
    root, _ = fake_bundle
    requests = [(images[name], prompt) for name in ("wide", "tall", "square") for prompt in PROMPTS][:10]
    with Bundle(root) as bundle:
        expected = [bundle.generate(img, p, max_new_tokens=8, ignore_eos=True).token_ids for img, p in requests]
        got = {}

        def worker(i):
            for j, (img, p) in enumerate(requests):
                got[i, j] = bundle.generate(img, p, max_new_tokens=8, ignore_eos=True).token_ids

        _run_all(worker, 4)
    assert len(set(expected)) > 1  # the requests differ, so a mixed-up cache would show
    assert all(got[i, j] == expected[j] for i in range(4) for j in range(len(requests)))


def test_a_generator_busy_on_another_thread_gives_a_status(handles, images):
    bundle, params = handles
    out = Out()
    assert capi.Generator_Create(bundle, params, str(images["wide"]), PROMPTS[0], False, out) == Status.OK
    gen = out.value
    obj = capi._objects[gen]
    entered, release = threading.Event(), threading.Event()
    step = obj.generate_next_token

    def slow_step():
        entered.set()
        release.wait(10)
        return step()

    obj.generate_next_token = slow_step
    statuses = []
    worker = threading.Thread(target=lambda: statuses.append(capi.Generator_GenerateNextToken(gen)))
    worker.start()
    assert entered.wait(10)
    assert capi.Generator_IsDone(gen, out) == Status.INVALID_ARGUMENT
    assert "in use by another thread" in capi.GetLastError()
    assert capi.Generator_GenerateNextToken(gen) == Status.INVALID_ARGUMENT
    assert capi.Generator_Destroy(gen) == Status.OK  # allowed while the other thread is inside a call
    release.set()
    worker.join()
    assert statuses == [Status.OK]  # the running call finished on the object it had
    assert capi.Generator_IsDone(gen, out) == Status.INVALID_ARGUMENT and "not a live Generator" in capi.GetLastError()
    assert capi.Generator_Destroy(gen) == Status.INVALID_ARGUMENT  # destroyed twice


def test_threads_racing_on_one_generator_never_corrupt_it(handles, images):
    """8 threads call GenerateNextToken on one generator: every call is OK or a status, and the tokens are the
    single-threaded ones (each successful call advanced exactly one step)."""
    bundle, params = handles
    out = Out()
    assert capi.GeneratorParams_SetMaxNewTokens(params, 0) == Status.OK
    assert capi.GeneratorParams_SetIgnoreEos(params, True) == Status.OK
    assert capi.Generator_Create(bundle, params, str(images["square"]), PROMPTS[1], False, out) == Status.OK
    ref = out.value
    while capi.Generator_IsDone(ref, out) == Status.OK and not out.value:
        assert capi.Generator_GenerateNextToken(ref) == Status.OK
    capi.Generator_GetTokenIds(ref, out)
    expected = out.value
    capi.Generator_Destroy(ref)

    assert capi.Generator_Create(bundle, params, str(images["square"]), PROMPTS[1], False, out) == Status.OK
    gen = out.value
    seen = []

    def hammer(_):
        mine = Out()
        for _ in range(200):
            st = capi.Generator_GenerateNextToken(gen)
            seen.append(st)
            if st == Status.CACHE_FULL or (capi.Generator_IsDone(gen, mine) == Status.OK and mine.value):
                return

    _run_all(hammer, 8)
    assert set(seen) <= {Status.OK, Status.INVALID_ARGUMENT, Status.CACHE_FULL}
    assert capi.Generator_GetTokenIds(gen, out) == Status.OK and out.value == expected
    assert seen.count(Status.OK) == len(expected)
    capi.Generator_Destroy(gen)


def test_bundle_destroyed_while_a_generator_runs(handles, images, fake_bundle):
    root, _ = fake_bundle
    _, params = handles
    out = Out()
    assert capi.Bundle_Create(str(root), out) == Status.OK
    bundle = out.value
    assert capi.Generator_Create(bundle, params, str(images["tall"]), PROMPTS[2], False, out) == Status.OK
    gen = out.value
    assert capi.Bundle_Destroy(bundle) == Status.OK
    assert capi.Bundle_Destroy(bundle) == Status.INVALID_ARGUMENT  # destroyed twice
    assert capi.Generator_Create(bundle, params, str(images["tall"]), PROMPTS[2], False, out) == Status.INVALID_ARGUMENT
    assert capi.TokenizerStream_Create(bundle, out) == Status.INVALID_ARGUMENT
    assert capi.Generator_GenerateNextToken(gen) == Status.OK  # its generator keeps what it uses alive
    assert capi.Generator_Destroy(gen) == Status.OK


class _DestroyBetween:
    """Stands in for capi's handle-table lock: before the second time a call takes it, another "thread" destroys
    `handle` (run right there, as a thread switch could). A call that looks its handle up in one critical
    section and registers it as busy in another then works on a dead handle and leaves a stale busy lock."""

    def __init__(self, real, destroy):
        self.real, self.destroy, self.taken, self.fired = real, destroy, 0, False

    def __enter__(self):
        self.taken += 1
        if self.taken == 2 and not self.fired:
            self.fired = True
            self.destroy()
        return self.real.__enter__()

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)


def test_a_destroy_between_look_up_and_busy_lock_cannot_revive_a_handle(handles, images, monkeypatch):
    bundle, params = handles
    out = Out()
    assert capi.Generator_Create(bundle, params, str(images["wide"]), "Hi", False, out) == Status.OK
    gen = out.value
    real = capi._lock
    gate = _DestroyBetween(real, lambda: capi.Generator_Destroy(gen))
    monkeypatch.setattr(capi, "_lock", gate)
    status = capi.Generator_GenerateNextToken(gen)
    monkeypatch.setattr(capi, "_lock", real)
    if gate.fired:  # the destroy came between two critical sections of the call: it must have won
        assert status == Status.INVALID_ARGUMENT
    else:  # one critical section: the call ran on the live handle
        assert status == Status.OK and capi.Generator_Destroy(gen) == Status.OK
    assert set(capi._busy) <= set(capi._objects)  # no busy lock left for a dead handle
    assert capi.Generator_Destroy(gen) == Status.INVALID_ARGUMENT
