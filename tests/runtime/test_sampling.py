import numpy as np
import pytest

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.sampling import Sampler, softmax, top_p_filter


def test_greedy_is_argmax_and_ignores_top_p():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert Sampler()(logits) == 1
    assert Sampler(temperature=0.0, top_p=0.1, seed=5)(logits) == 1


@pytest.mark.parametrize("top_p, kept", [(0.5, [0]), (0.7, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3]),
                                         (1e-6, [0])])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, kept):
    probs = np.array([0.5, 0.3, 0.15, 0.05])[[2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2 by probability
    order = [1, 3, 0, 2]
    out = top_p_filter(probs, top_p)
    assert sorted(np.flatnonzero(out)) == sorted(order[i] for i in kept)
    assert out.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(out[np.flatnonzero(out)], probs[np.flatnonzero(out)] / probs[np.flatnonzero(out)].sum())


def test_top_p_ties_break_by_token_id():
    out = top_p_filter(np.array([0.25, 0.25, 0.25, 0.25]), 0.5)
    np.testing.assert_allclose(out, [0.5, 0.5, 0, 0])


def test_seeded_sampling_is_deterministic():
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    s1, s2, s3 = Sampler(1.0, 0.9, seed=7), Sampler(1.0, 0.9, seed=7), Sampler(1.0, 0.9, seed=8)
    run1 = [s1(logits) for _ in range(40)]
    run2 = [s2(logits) for _ in range(40)]
    run3 = [s3(logits) for _ in range(40)]
    assert run1 == run2 and len(set(run1)) > 1
    assert run1 != run3


def test_sampling_follows_the_filtered_distribution():
    logits = np.log(np.array([0.6, 0.25, 0.1, 0.05]))
    sampler = Sampler(temperature=1.0, top_p=0.8, seed=0)  # keeps ids 0 and 1: 0.6/0.85, 0.25/0.85
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=4)
    assert counts[2] == counts[3] == 0
    assert counts[0] / 4000 == pytest.approx(0.6 / 0.85, abs=0.03)


def test_temperature_sharpens():
    logits = np.array([1.0, 0.0])
    assert softmax(logits, 0.5)[0] > softmax(logits, 1.0)[0] > softmax(logits, 2.0)[0]


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                                dict(seed=-1), dict(seed=1.5)])
def test_bad_parameters(kw):
    with pytest.raises(RuntimeStatusError) as e:
        Sampler(**kw)
    assert e.value.status == Status.INVALID_ARGUMENT
