"""The bounded least-recently-used map behind the page, block, file and window caches."""

from lvbackup.base.lru import LRU


def test_the_least_recently_used_goes_first_and_is_handed_over():
    gone: list[tuple[str, int]] = []
    cache: LRU[str, int] = LRU(2, lambda k, v: gone.append((k, v)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1          # now b is the least recently used
    cache.put("c", 3)
    assert gone == [("b", 2)]
    assert list(cache) == ["a", "c"] and "b" not in cache and cache.get("b") is None


def test_peek_leaves_the_order():
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.peek("a") == 1
    cache.put("c", 3)
    assert list(cache) == ["b", "c"]


def test_weights_bound_the_total_and_reweigh_counts_the_new_weight():
    cache: LRU[int, bytes] = LRU(10)
    cache.put(1, b"x", 4)
    cache.put(2, b"y", 4)
    cache.put(1, b"z", 5)               # replaced: counted once, and the most recent
    assert cache.weight == 9 and list(cache) == [2, 1]
    cache.put(3, b"w", 3)               # 12 > 10: 2 goes
    assert list(cache) == [1, 3] and cache.weight == 8
    cache.reweigh(1, 1)
    assert cache.weight == 4
    cache.put(4, b"big", 11)            # heavier than the limit alone: nothing stays
    assert len(cache) == 0 and cache.weight == 0


def test_pop_and_clear_hand_nothing_to_evicted():
    gone: list[int] = []
    cache: LRU[str, int] = LRU(5, lambda k, v: gone.append(v))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.pop("a") == 1 and cache.pop("a") is None
    assert cache.clear() == [2]
    assert gone == [] and len(cache) == 0 and cache.weight == 0
