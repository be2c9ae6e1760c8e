"""One loaded tiny-twin bundle serves 4 threads x 10 greedy requests with exactly the single-threaded tokens."""

from __future__ import annotations

import threading

from edgeprune_runtime import Bundle
from tiny_inputs import random_image

PROMPTS = ["What is in the picture?", "Is there a dog?", "What color is the car?", "Where is the ball?", "Describe it."]


def test_four_threads_ten_requests_each(tiny_bundles, tmp_path):
    images = []
    for i, hw in enumerate([(60, 200), (300, 90), (100, 100)]):  # three crop grids
        images.append(tmp_path / f"{i}.png")
        random_image(hw, seed=i).save(images[-1])
    requests = [(images[i % 3], PROMPTS[i % 5]) for i in range(10)]
    with Bundle(tiny_bundles[0.2]) as bundle:
        expected = [bundle.generate(img, p, max_new_tokens=12, ignore_eos=True).token_ids for img, p in requests]
        got, errors = {}, []

        def worker(t):
            try:
                for j, (img, p) in enumerate(requests[t:] + requests[:t]):  # each thread in another order
                    got[t, (j + t) % 10] = bundle.generate(img, p, max_new_tokens=12, ignore_eos=True).token_ids
            except BaseException as e:  # reported to the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors[0]
    assert len(set(expected)) > 3  # different requests, different answers: a mixed-up cache would show
    assert {k: got[k] for k in sorted(got)} == {(t, j): expected[j] for t in range(4) for j in range(10)}
