"""The fixed-size cache: compaction of the valid prefill slots and in-place appends."""

import numpy as np
import pytest

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.kvcache import KVCache, prefill_slot_valid


def test_prefill_order_is_text_before_visual_text_after():
    text_valid = np.array([1, 1, 0, 1, 1, 1, 0], np.float32)  # T1 = 3, T2 = 4
    visual_valid = np.array([1, 0, 1], np.float32)
    got = prefill_slot_valid(text_valid, visual_valid, 3)
    np.testing.assert_array_equal(got, [1, 1, 0, 1, 0, 1, 1, 1, 1, 0])
    assert got.dtype == np.float32


def _prefill_kv(kv_heads, s, dh, rng):
    keys = [rng.standard_normal((h, s, dh)).astype(np.float32) for h in kv_heads]
    values = [rng.standard_normal((h, s, dh)).astype(np.float32) for h in kv_heads]
    return keys, values


def test_fill_compacts_valid_slots_per_layer():
    rng = np.random.default_rng(0)
    kv_heads, s, dh, c = (2, 1, 3), 7, 4, 10  # layers with different KV heads
    keys, values = _prefill_kv(kv_heads, s, dh, rng)
    slot_valid = np.array([1, 0, 0, 1, 1, 0, 1], np.float32)
    cache = KVCache(kv_heads, c, dh)
    for valid in cache.valid:
        valid[:] = 1.0  # flags of an earlier request must not survive
    n = cache.fill_from_prefill(keys, values, slot_valid)
    assert n == cache.length == 4
    idx = [0, 3, 4, 6]
    for layer in range(3):
        np.testing.assert_array_equal(cache.keys[layer][:, :4], keys[layer][:, idx])
        np.testing.assert_array_equal(cache.values[layer][:, :4], values[layer][:, idx])
    for valid in cache.valid:
        np.testing.assert_array_equal(valid, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])


def test_append_writes_the_next_slot_in_place():
    rng = np.random.default_rng(1)
    kv_heads, dh = (2, 1), 4
    cache = KVCache(kv_heads, 6, dh)
    keys, values = _prefill_kv(kv_heads, 3, dh, rng)
    cache.fill_from_prefill(keys, values, np.ones(3, np.float32))
    buffers = [id(b) for b in cache.keys + cache.values]
    new_k = [rng.standard_normal((h, 1, dh)).astype(np.float32) for h in kv_heads]
    new_v = [rng.standard_normal((h, 1, dh)).astype(np.float32) for h in kv_heads]
    assert cache.append(new_k, new_v) == 3
    assert cache.length == 4 and not cache.full
    assert [id(b) for b in cache.keys + cache.values] == buffers  # same buffers: sessions stay bound
    for layer in range(2):
        np.testing.assert_array_equal(cache.keys[layer][:, 3], new_k[layer][:, 0])
        np.testing.assert_array_equal(cache.values[layer][:, 3], new_v[layer][:, 0])
    for valid in cache.valid:
        np.testing.assert_array_equal(valid, [1, 1, 1, 1, 0, 0])


def test_append_of_several_slots_equals_fill_of_them():
    """Several tokens appended in two calls (T = 3, then 2) after a clear leave the cache exactly as one prefill fill
    of the same 5 slots (the reference: fill_from_prefill, tested above); too many for the room left is CACHE_FULL."""
    rng = np.random.default_rng(2)
    kv_heads, dh = (2, 1), 4
    keys, values = _prefill_kv(kv_heads, 5, dh, rng)
    filled = KVCache(kv_heads, 7, dh)
    filled.fill_from_prefill(keys, values, np.ones(5, np.float32))
    cache = KVCache(kv_heads, 7, dh)
    cache.fill_from_prefill(*_prefill_kv(kv_heads, 6, dh, rng), np.ones(6, np.float32))  # an earlier request
    cache.clear()
    assert cache.length == 0 and cache.room() == 7 and not any(v.any() for v in cache.valid)
    assert cache.append([k[:, :3] for k in keys], [v[:, :3] for v in values]) == 0
    assert cache.append([k[:, 3:] for k in keys], [v[:, 3:] for v in values]) == 3
    assert cache.length == 5 and cache.lengths == [5, 5]
    for layer in range(2):
        np.testing.assert_array_equal(cache.keys[layer][:, :5], filled.keys[layer][:, :5])
        np.testing.assert_array_equal(cache.values[layer][:, :5], filled.values[layer][:, :5])
        np.testing.assert_array_equal(cache.valid[layer], filled.valid[layer])
    with pytest.raises(RuntimeStatusError) as e:
        cache.append([k[:, :3] for k in keys], [v[:, :3] for v in values])
    assert e.value.status == Status.CACHE_FULL and e.value.message == "3 more tokens need cache slots, 2 are left of 7"
    assert cache.length == 5  # nothing written


def test_full_cache_refuses_more():
    cache = KVCache((1,), 2, 2)
    one = [np.ones((1, 1, 2), np.float32)]
    cache.append(one, one)
    cache.append(one, one)
    assert cache.full
    with pytest.raises(RuntimeStatusError) as e:
        cache.append(one, one)
    assert e.value.status == Status.CACHE_FULL
    assert e.value.message == "the KV cache is full (2 slots)"


def test_prefill_larger_than_cache():
    cache = KVCache((1,), 2, 2)
    kv = [np.zeros((1, 3, 2), np.float32)]
    with pytest.raises(RuntimeStatusError) as e:
        cache.fill_from_prefill(kv, kv, np.ones(3, np.float32))
    assert e.value.status == Status.CACHE_FULL
    assert e.value.message == "the prompt fills 3 cache slots, the bundle has 2"


def test_a_new_cache_is_empty_float32_per_layer():
    cache = KVCache((3, 1), 5, 4)
    assert cache.capacity == 5 and cache.length == 0 and not cache.full
    assert [k.shape for k in cache.keys] == [(3, 5, 4), (1, 5, 4)] == [v.shape for v in cache.values]
    assert all(b.dtype == np.float32 and not b.any() for b in cache.keys + cache.values)
    assert all(v.dtype == np.float32 and not v.any() and v.shape == (5,) for v in cache.valid)
    assert KVCache((1,), 2, 2, dtype=np.float16).keys[0].dtype == np.float16


def test_a_prompt_that_exactly_fills_the_cache_fits_and_leaves_it_full():
    cache = KVCache((1,), 3, 2)
    kv = [np.arange(8, dtype=np.float32).reshape(1, 4, 2)]
    assert cache.fill_from_prefill(kv, kv, np.array([1, 1, 0, 1], np.float32)) == 3
    assert cache.full
    np.testing.assert_array_equal(cache.keys[0][0], [[0, 1], [2, 3], [6, 7]])


def test_keys_and_values_go_to_their_own_buffers():
    cache = KVCache((1,), 4, 2)
    keys, values = [np.ones((1, 2, 2), np.float32)], [np.full((1, 2, 2), 2.0, np.float32)]
    cache.fill_from_prefill(keys, values, np.ones(2, np.float32))
    cache.append([np.full((1, 1, 2), 3.0, np.float32)], [np.full((1, 1, 2), 4.0, np.float32)])
    np.testing.assert_array_equal(cache.keys[0][0, :3], [[1, 1], [1, 1], [3, 3]])
    np.testing.assert_array_equal(cache.values[0][0, :3], [[2, 2], [2, 2], [4, 4]])


def test_layers_with_their_own_capacity_and_tokens():
    """Visual-token dropping: layer 1 holds fewer prefill slots (its own validity) in a smaller cache;
    SkipDecode: a token appended from layer 1 on leaves layer 0 alone, and the position still advances."""
    rng = np.random.default_rng(2)
    dh = 2
    cache = KVCache((1, 2), [6, 4], dh)
    keys = [rng.standard_normal((1, 5, dh)).astype(np.float32), rng.standard_normal((2, 3, dh)).astype(np.float32)]
    values = [k + 1.0 for k in keys]
    assert cache.fill_from_prefill(keys, values, [np.array([1, 1, 0, 1, 1], np.float32),
                                                  np.array([0, 1, 1], np.float32)]) == 4
    assert cache.lengths == [4, 2] and cache.position == 4 and cache.room() == 2
    np.testing.assert_array_equal(cache.keys[1][:, :2], keys[1][:, 1:])
    np.testing.assert_array_equal(cache.valid[1], [1, 1, 0, 0])
    new = [np.full((h, 1, dh), 9.0, np.float32) for h in (1, 2)]
    assert cache.append(new[1:], new[1:], first_layer=1) == 4
    assert cache.lengths == [4, 3] and cache.position == 5
    np.testing.assert_array_equal(cache.valid[0], [1, 1, 1, 1, 0, 0])  # layer 0 never saw the token
    np.testing.assert_array_equal(cache.keys[1][:, 2], new[1][:, 0])
    cache.append(new[1:], new[1:], first_layer=1)
    with pytest.raises(RuntimeStatusError) as e:  # layer 1 is full though layer 0 has room
        cache.append(new[1:], new[1:], first_layer=1)
    assert e.value.status == Status.CACHE_FULL and cache.full


def test_prefill_larger_than_a_layer_names_the_layer():
    cache = KVCache((1, 1), [3, 2], 2)
    kv = [np.zeros((1, 3, 2), np.float32)] * 2
    with pytest.raises(RuntimeStatusError) as e:
        cache.fill_from_prefill(kv, kv, np.ones(3, np.float32))
    assert e.value.message == "the prompt fills 3 cache slots in layer 1, the bundle has 2"


# --- a cache on a device (buffers without numpy views), dtypes, and appends to the layers a token runs ----------


class _ViewlessDevice:
    """Host memory behind Buffers without numpy views, as a GPU cache's are (backends/device.py)."""

    def __init__(self):
        from edgeprune_runtime.backends.device import HOST

        self.host, self.kept = HOST, []

    def zeros(self, shape, dtype):
        from edgeprune_runtime.backends.device import Buffer

        b = self.host.zeros(shape, dtype)
        self.kept.append(b.host)  # the memory must outlive the view-less Buffer
        return Buffer(b.value, b.shape, b.dtype)

    def copy2d(self, *args):
        self.host.copy2d(*args)

    def synchronize(self):
        pass


def test_a_device_cache_has_no_numpy_views_and_refuses_host_arrays():
    cache = KVCache((2,), 4, 3, device=_ViewlessDevice())
    with pytest.raises(RuntimeStatusError) as e:
        cache.keys
    assert e.value.status == Status.INVALID_ARGUMENT
    assert str(e.value) == "this KV cache lives on the GPU; only a CPU-backend cache has numpy views"
    with pytest.raises(RuntimeStatusError) as e:
        cache.append([np.zeros((2, 1, 3), np.float32)], [np.zeros((2, 1, 3), np.float32)])
    assert e.value.status == Status.INTERNAL_ERROR
    assert str(e.value) == "a host array was given to a GPU cache (a bug in edgeprune_runtime)"


def test_host_arrays_are_stored_in_the_caches_dtype():
    """A float16 cache (fp16 bundles) given float32 K/V stores their float16 values, not their bytes."""
    rng = np.random.default_rng(3)
    cache = KVCache((2, 1), 5, 4, dtype=np.float16)
    keys, values = _prefill_kv((2, 1), 3, 4, rng)
    cache.fill_from_prefill(keys, values, np.array([1, 0, 1], np.float32))
    new_k = [rng.standard_normal((h, 1, 4)).astype(np.float32) for h in (2, 1)]
    new_v = [rng.standard_normal((h, 1, 4)).astype(np.float32) for h in (2, 1)]
    cache.append(new_k, new_v)
    for layer in range(2):
        assert cache.keys[layer].dtype == np.float16
        np.testing.assert_array_equal(cache.keys[layer][:, :2], keys[layer][:, [0, 2]].astype(np.float16))
        np.testing.assert_array_equal(cache.keys[layer][:, 2], new_k[layer][:, 0].astype(np.float16))
        np.testing.assert_array_equal(cache.values[layer][:, 2], new_v[layer][:, 0].astype(np.float16))


def test_an_append_needs_room_only_in_the_layers_it_writes():
    """SkipDecode writes a token into the layers from `first_layer` on: a full skipped layer does not stop it,
    a full written layer does (capacities 2 and 4; layer 0 is filled by two tokens that ran every layer)."""
    cache = KVCache((1, 1), (2, 4), 2)
    one = [np.ones((1, 1, 2), np.float32)] * 2
    cache.append(one, one)
    cache.append(one, one)
    assert cache.room() == 0 and cache.room([1]) == 2
    assert cache.append(one[1:], one[1:], first_layer=1) == 2
    assert cache.lengths == [2, 3] and cache.position == 3
    cache.append(one[1:], one[1:], first_layer=1)
    with pytest.raises(RuntimeStatusError) as e:
        cache.append(one[1:], one[1:], first_layer=1)
    assert e.value.status == Status.CACHE_FULL


# --- eviction (cache_policy.py): survivors move left, keys re-rotated to their new slots --------------------


def _rope_complex(base: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """base [H, n, Dh] -> RoPE at `positions` [n], as complex numbers: the pair (x_j, x_{j+Dh/2}) is x_j + i x_{j+Dh/2},
    multiplied by exp(i p inv_freq_j) (the rotate_half form, written apart from cache_policy.rerotate)."""
    half = base.shape[-1] // 2
    z = (base[..., :half] + 1j * base[..., half:]) * np.exp(1j * positions[:, None] * inv_freq[None, :])
    return np.concatenate([z.real, z.imag], axis=-1)


def test_evict_moves_survivors_and_rerotates_keys_per_layer_head_count():
    rng = np.random.default_rng(5)
    kv_heads, c, dh = (3, 1), 10, 8  # head pruning: layers with different KV heads
    inv_freq = 10000.0 ** (-np.arange(0, dh, 2) / dh)
    base = [rng.standard_normal((h, c, dh)) for h in kv_heads]  # keys before RoPE
    keys = [_rope_complex(b, np.arange(c, dtype=np.float64), inv_freq).astype(np.float32) for b in base]
    values = [rng.standard_normal((h, c, dh)).astype(np.float32) for h in kv_heads]
    cache = KVCache(kv_heads, c, dh)
    cache.fill_from_prefill(keys, values, np.ones(c, np.float32))
    cache.evict([2, 5, 6], inv_freq)
    kept = [0, 1, 3, 4, 7, 8, 9]
    assert cache.lengths == [7, 7] and cache.position == 7
    for layer in range(len(kv_heads)):
        expected = _rope_complex(base[layer][:, kept], np.arange(7, dtype=np.float64), inv_freq)  # slot i: position i
        np.testing.assert_allclose(cache.keys[layer][:, :7], expected, atol=2e-6)
        np.testing.assert_array_equal(cache.values[layer][:, :7], values[layer][:, kept])  # values are not rotated
        np.testing.assert_array_equal(cache.valid[layer], [1] * 7 + [0] * 3)


@pytest.mark.parametrize("slots", [[3, 3], [5, 2], [2, 7], [-1, 2]])
def test_evict_refuses_duplicate_unsorted_or_invalid_slots_and_changes_nothing(slots):
    c, dh = 8, 4
    cache = KVCache([1], c, dh)
    keys = np.arange(c * dh, dtype=np.float32).reshape(1, c, dh)
    cache.fill_from_prefill([keys], [keys], np.array([1] * 7 + [0], np.float32))  # 7 valid slots: 7 is not one
    with pytest.raises(RuntimeStatusError) as e:
        cache.evict(slots, np.ones(dh // 2))
    assert e.value.status == Status.INTERNAL_ERROR
    assert cache.lengths == [7] and cache.position == 7
    np.testing.assert_array_equal(cache.keys[0][:, :7], keys[:, :7])


def _filled(c: int, n: int, dh: int, inv_freq: np.ndarray, seed: int = 7):
    """A one-layer cache of capacity c holding n valid slots, keys RoPE'd at their slots; and the keys before RoPE."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((2, c, dh))
    keys = _rope_complex(base, np.arange(c, dtype=np.float64), inv_freq).astype(np.float32)
    values = rng.standard_normal((2, c, dh)).astype(np.float32)
    cache = KVCache([2], c, dh)
    cache.fill_from_prefill([keys], [values], np.array([1] * n + [0] * (c - n), np.float32))
    return cache, base, values


@pytest.mark.parametrize("slots", [[0], [0, 4], [3], [8], [0, 1, 2, 3, 4, 5, 6, 7]])
def test_evict_from_a_cache_that_is_not_full(slots):
    """Capacity 12, 9 valid slots: the survivors land at 0.. with their keys at those positions, the rest is invalid."""
    c, n, dh = 12, 9, 8
    inv_freq = 10000.0 ** (-np.arange(0, dh, 2) / dh)
    cache, base, values = _filled(c, n, dh, inv_freq)
    cache.evict(slots, inv_freq)
    kept = [i for i in range(n) if i not in slots]
    m = len(kept)
    assert cache.lengths == [m] and cache.position == m
    np.testing.assert_allclose(cache.keys[0][:, :m], _rope_complex(base[:, kept], np.arange(m, dtype=np.float64), inv_freq),
                               atol=2e-6)
    np.testing.assert_array_equal(cache.values[0][:, :m], values[:, kept])
    np.testing.assert_array_equal(cache.valid[0], [1] * m + [0] * (c - m))


def test_evicting_nothing_changes_nothing():
    inv_freq = np.ones(2)
    cache, _, _ = _filled(6, 4, 4, inv_freq)
    before = cache.keys[0].copy()
    cache.evict([], inv_freq)
    assert cache.lengths == [4] and cache.position == 4
    np.testing.assert_array_equal(cache.keys[0], before)


def test_evict_names_what_it_refuses():
    inv_freq = np.ones(2)
    cache, _, _ = _filled(8, 5, 4, inv_freq)
    with pytest.raises(RuntimeStatusError) as e:
        cache.evict([0, 1, 5], inv_freq)  # 5 is past the 5 valid slots
    assert (e.value.status, e.value.message) == (Status.INTERNAL_ERROR, "evict takes ascending valid slots < 5")
    uneven = KVCache((1, 1), 4, 4)
    one = [np.ones((1, 1, 4), np.float32)] * 2
    uneven.append(one, one)
    uneven.append(one[1:], one[1:], first_layer=1)  # SkipDecode: layer 0 holds 1 token, layer 1 holds 2
    for slots in ([0], [0, 1]):
        with pytest.raises(RuntimeStatusError) as e:
            uneven.evict(slots, inv_freq)
        assert (e.value.status, e.value.message) == (Status.INTERNAL_ERROR, "eviction needs every layer to hold the same tokens")


def test_a_multi_slot_append_counts_the_room_of_the_layers_it_writes():
    cache = KVCache((1, 1), (2, 6), 2)
    two = [np.ones((1, 2, 2), np.float32)] * 2
    cache.append(two, two)  # layer 0 is now full, layer 1 has 4 slots left
    three = [np.ones((1, 3, 2), np.float32)]
    cache.append(three, three, first_layer=1)  # 1 slot left in layer 1
    with pytest.raises(RuntimeStatusError) as e:
        cache.append(two[1:], two[1:], first_layer=1)
    assert (e.value.status, e.value.message) == (Status.CACHE_FULL, "2 more tokens need cache slots, 1 are left of 6")
