"""KVCacheManager: block tables, prefix hits, eviction order and invariants under random load."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from adaptserve.engine.kv_cache import KVCacheBlock, KVCacheManager

BLOCK_SIZE = 4


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


def schedule_prefill(manager: KVCacheManager, request: FakeRequest) -> list[KVCacheBlock] | None:
    """What a scheduler does for a waiting request: look up hits, allocate, advance."""
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(request)
    num_new_tokens = request.num_tokens - num_hit_tokens
    new_blocks = manager.allocate_slots(request, num_new_tokens, hit_blocks)
    if new_blocks is not None:
        request.num_computed_tokens += num_hit_tokens + num_new_tokens
    return new_blocks


def decode_step(manager: KVCacheManager, request: FakeRequest, token_id: int) -> list[KVCacheBlock] | None:
    """Append a sampled token, then allocate a slot for it (it is computed in the next step)."""
    request.output_token_ids.append(token_id)
    new_blocks = manager.allocate_slots(request, 1)
    if new_blocks is not None:
        request.num_computed_tokens += 1
    return new_blocks


def snapshot(manager: KVCacheManager) -> tuple:
    pool = manager.block_pool
    return (
        [b.block_id for b in pool.free_block_queue],
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        dict(pool.cached_blocks),
        {rid: list(blocks) for rid, blocks in manager.req_to_blocks.items()},
        {rid: list(h) for rid, h in manager.req_to_block_hashes.items()},
        dict(manager.num_cached_blocks),
    )


def test_allocate_and_free_return_every_block():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(10)))
    new_blocks = schedule_prefill(manager, request)
    assert [b.block_id for b in new_blocks] == [0, 1, 2]
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert manager.num_free_blocks == 7
    assert manager.usage == pytest.approx(0.3)
    assert decode_step(manager, request, 100) == []  # token 11 fits in block 2
    assert decode_step(manager, request, 101) == []  # token 12 fills block 2
    assert [b.block_id for b in decode_step(manager, request, 102)] == [3]
    assert manager.get_block_ids("a") == [0, 1, 2, 3]
    manager.free(request)
    assert manager.num_free_blocks == 10
    assert manager.usage == 0.0
    assert manager.get_block_ids("a") == []
    assert all(b.ref_cnt == 0 for b in manager.block_pool.blocks)


def test_full_blocks_are_registered_once_their_tokens_are_computed():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(6)))
    schedule_prefill(manager, request)
    assert manager.block_pool.num_cached_blocks == 1
    decode_step(manager, request, 100)
    assert manager.block_pool.num_cached_blocks == 1
    decode_step(manager, request, 101)  # position 7 completes block 1
    assert manager.block_pool.num_cached_blocks == 2
    blocks = manager.req_to_blocks["a"]
    assert blocks[1].block_hash == manager.req_to_block_hashes["a"][1]


def test_chunked_prefill_registers_only_computed_blocks():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(12)))
    manager.get_computed_blocks(request)
    manager.allocate_slots(request, 6)
    request.num_computed_tokens = 6
    assert manager.block_pool.num_cached_blocks == 1
    manager.allocate_slots(request, 6)
    request.num_computed_tokens = 12
    assert manager.block_pool.num_cached_blocks == 3
    assert manager.get_block_ids("a") == [0, 1, 2]


def test_shared_prefix_hits_and_ref_counts():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK_SIZE)
    prefix = list(range(3 * BLOCK_SIZE))
    first = FakeRequest("a", prefix + [100, 101])
    second = FakeRequest("b", prefix + [200, 201, 202, 203, 204])
    schedule_prefill(manager, first)
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(second)
    assert num_hit_tokens == 3 * BLOCK_SIZE
    assert hit_blocks == manager.req_to_blocks["a"][:3]
    new_blocks = manager.allocate_slots(second, second.num_tokens - num_hit_tokens, hit_blocks)
    assert len(new_blocks) == 2
    assert manager.get_block_ids("b")[:3] == manager.get_block_ids("a")[:3]
    assert [b.ref_cnt for b in manager.req_to_blocks["b"]] == [2, 2, 2, 1, 1]
    assert manager.prefix_cache_queries == first.num_tokens + second.num_tokens
    assert manager.prefix_cache_hits == 3 * BLOCK_SIZE
    manager.free(first)
    assert [b.ref_cnt for b in manager.req_to_blocks["b"]] == [1, 1, 1, 1, 1]
    manager.free(second)
    assert manager.num_free_blocks == 20


def test_prompt_of_exactly_n_full_blocks_hits_n_minus_one():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK_SIZE)
    prompt = list(range(4 * BLOCK_SIZE))
    schedule_prefill(manager, FakeRequest("a", prompt))
    assert manager.block_pool.num_cached_blocks == 4
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(FakeRequest("b", list(prompt)))
    assert len(hit_blocks) == 3
    assert num_hit_tokens == 3 * BLOCK_SIZE
    # One more token and all four blocks can hit.
    _, num_hit_tokens = manager.get_computed_blocks(FakeRequest("c", prompt + [9]))
    assert num_hit_tokens == 4 * BLOCK_SIZE


def test_hit_stops_at_first_miss():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK_SIZE)
    schedule_prefill(manager, FakeRequest("a", list(range(12)) + [0]))
    changed = list(range(12)) + [0]
    changed[5] = 99  # block 1 differs, so block 2 cannot hit even though its tokens match
    _, num_hit_tokens = manager.get_computed_blocks(FakeRequest("b", changed))
    assert num_hit_tokens == BLOCK_SIZE


def test_hit_stops_at_an_evicted_middle_block():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    prompt = list(range(3 * BLOCK_SIZE)) + [0]
    schedule_prefill(manager, FakeRequest("a", prompt))
    head, middle, _, _ = manager.req_to_blocks["a"]
    manager.free(FakeRequest("a", prompt))
    queue = manager.block_pool.free_block_queue
    queue.remove(middle)
    queue.appendleft(middle)  # make the middle block the next to be evicted
    manager.allocate_slots(FakeRequest("x", [5]), 1)
    assert middle.block_hash is None
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(FakeRequest("b", list(prompt)))
    assert hit_blocks == [head]
    assert num_hit_tokens == BLOCK_SIZE


def test_lookahead_slots_register_only_blocks_with_real_tokens():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(6)))
    manager.get_computed_blocks(request)
    # Slots for the prompt plus 7 speculative positions: 13 slots, 4 blocks; only block 0 is full.
    new_blocks = manager.allocate_slots(request, request.num_tokens + 7)
    assert len(new_blocks) == 4
    assert manager.block_pool.num_cached_blocks == 1
    assert new_blocks[0].block_hash is not None
    assert all(b.block_hash is None for b in new_blocks[1:])


def test_stats_count_each_request_once_until_freed():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK_SIZE)
    schedule_prefill(manager, FakeRequest("a", list(range(9))))
    waiting = FakeRequest("b", list(range(9)))
    for _ in range(3):  # e.g. it waits three steps for memory
        manager.get_computed_blocks(waiting)
    assert manager.prefix_cache_queries == 18
    assert manager.prefix_cache_hits == 8
    assert manager.prefix_cache_hit_rate == pytest.approx(8 / 18)
    manager.free(waiting)  # preempted or aborted: asked again later, counted again
    manager.get_computed_blocks(waiting)
    assert manager.prefix_cache_queries == 27
    assert manager.prefix_cache_hits == 16


def test_sibling_hits_blocks_registered_earlier_in_the_same_step():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK_SIZE)
    prompt = list(range(10))
    siblings = [FakeRequest(f"s{i}", list(prompt)) for i in range(3)]
    for request in siblings:
        schedule_prefill(manager, request)
    tables = [manager.get_block_ids(r.request_id) for r in siblings]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # each owns its partial last block
    assert manager.prefix_cache_hits == 2 * 8
    assert manager.num_free_blocks == 20 - 2 - 3


def test_duplicate_full_block_keeps_first_mapping():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK_SIZE)
    prompt = list(range(8))
    first, second = FakeRequest("a", list(prompt)), FakeRequest("b", list(prompt))
    schedule_prefill(manager, first)
    # The second one is allocated without using its hits: its full blocks duplicate the first's.
    manager.allocate_slots(second, second.num_tokens)
    second.num_computed_tokens = second.num_tokens
    a_blocks, b_blocks = manager.req_to_blocks["a"], manager.req_to_blocks["b"]
    assert manager.block_pool.num_cached_blocks == 2
    assert all(manager.block_pool.get_cached_block(b.block_hash) is b for b in a_blocks)
    assert all(b.block_hash is None for b in b_blocks)
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 20


def test_lru_eviction_of_cached_blocks():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    requests = [FakeRequest(name, [k] * BLOCK_SIZE) for k, name in enumerate("abc")]
    for request in requests:
        schedule_prefill(manager, request)
    hashes = {r.request_id: manager.req_to_blocks[r.request_id][0].block_hash for r in requests}
    for name in "bac":
        manager.free(requests["abc".index(name)])
    assert manager.block_pool.num_cached_blocks == 3
    # One never-used block, then cached blocks least recently freed first.
    assert [b.block_id for b in manager.block_pool.free_block_queue] == [3, 1, 0, 2]

    filler = FakeRequest("x", list(range(100, 100 + 2 * BLOCK_SIZE - 1)))
    schedule_prefill(manager, filler)  # takes block 3 and evicts b's block
    assert manager.get_block_ids("x") == [3, 1]
    assert manager.block_pool.get_cached_block(hashes["b"]) is None
    assert manager.block_pool.get_cached_block(hashes["a"]) is not None
    _, num_hit_tokens = manager.get_computed_blocks(FakeRequest("b2", [1] * BLOCK_SIZE + [7]))
    assert num_hit_tokens == 0
    _, num_hit_tokens = manager.get_computed_blocks(FakeRequest("a2", [0] * BLOCK_SIZE + [7]))
    assert num_hit_tokens == BLOCK_SIZE


def test_hit_refreshes_lru_position():
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    a, b = FakeRequest("a", [1] * BLOCK_SIZE), FakeRequest("b", [2] * BLOCK_SIZE)
    schedule_prefill(manager, a)
    schedule_prefill(manager, b)
    manager.free(a)
    manager.free(b)
    # Reusing a's prefix and freeing again makes a the most recently used.
    again = FakeRequest("a-again", [1] * BLOCK_SIZE + [5])
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(again)
    assert num_hit_tokens == BLOCK_SIZE
    assert manager.allocate_slots(again, 1, hit_blocks) is not None
    manager.free(again)
    assert [blk.block_id for blk in manager.block_pool.free_block_queue] == [1, 0]
    manager.allocate_slots(FakeRequest("y", [9]), 1)
    assert manager.get_computed_blocks(FakeRequest("b2", [2] * BLOCK_SIZE + [5]))[1] == 0
    assert manager.get_computed_blocks(FakeRequest("a2", [1] * BLOCK_SIZE + [5]))[1] == BLOCK_SIZE


def test_free_releases_tail_blocks_first():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    prompt = list(range(3 * BLOCK_SIZE))
    schedule_prefill(manager, FakeRequest("a", prompt))
    head, middle, tail = manager.req_to_blocks["a"]
    manager.free(FakeRequest("a", prompt))
    assert list(manager.block_pool.free_block_queue) == [tail, middle, head]
    manager.allocate_slots(FakeRequest("x", [0]), 1)  # evicts the tail only
    _, num_hit_tokens = manager.get_computed_blocks(FakeRequest("b", prompt + [1]))
    assert num_hit_tokens == 2 * BLOCK_SIZE


def test_failed_allocation_returns_none_and_changes_nothing():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    schedule_prefill(manager, FakeRequest("a", list(range(8))))
    manager.free(FakeRequest("a", []))  # two free cached blocks, 5 free in all
    running = FakeRequest("r", [50] * 5)
    schedule_prefill(manager, running)  # takes 2 uncached blocks; 3 free, 2 of them cached hits
    before = snapshot(manager)
    # Needs the 2 free hit blocks plus 2 new ones: 4 > 3 free, though 2 new <= 3 free.
    big = FakeRequest("b", list(range(8)) + [1] * 5)
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(big)
    assert num_hit_tokens == 8
    counted = snapshot(manager)  # get_computed_blocks only memoizes hashes and counts stats
    assert manager.allocate_slots(big, big.num_tokens - num_hit_tokens, hit_blocks) is None
    assert snapshot(manager) == counted
    assert counted[:4] == before[:4]
    # A decode step that needs a new block also fails cleanly when the pool is empty.
    filler = FakeRequest("f", [7] * 12)
    assert schedule_prefill(manager, filler) is not None
    assert manager.num_free_blocks == 0
    before = snapshot(manager)
    running.output_token_ids.extend([1, 2, 3])
    running.num_computed_tokens += 2
    assert manager.allocate_slots(running, 2) is None
    assert snapshot(manager) == before


def test_hits_from_before_another_allocation_are_rejected():
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    schedule_prefill(manager, FakeRequest("a", [1] * BLOCK_SIZE))
    manager.free(FakeRequest("a", []))
    late = FakeRequest("late", [1] * BLOCK_SIZE + [2])
    hit_blocks, _ = manager.get_computed_blocks(late)
    manager.allocate_slots(FakeRequest("x", [0] * 8), 8)  # evicts the hit block
    with pytest.raises(ValueError, match="no longer cached"):
        manager.allocate_slots(late, 1, hit_blocks)


def test_reset_prefix_cache():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = FakeRequest("a", list(range(9)))
    schedule_prefill(manager, request)
    assert not manager.reset_prefix_cache()
    assert manager.block_pool.num_cached_blocks == 2
    manager.free(request)
    assert manager.reset_prefix_cache()
    assert manager.block_pool.num_cached_blocks == 0
    assert manager.get_computed_blocks(FakeRequest("b", list(range(9)))) == ([], 0)


def test_prefix_caching_disabled():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    prompt = list(range(9))
    schedule_prefill(manager, FakeRequest("a", prompt))
    assert manager.block_pool.num_cached_blocks == 0
    assert manager.get_computed_blocks(FakeRequest("b", prompt)) == ([], 0)
    assert manager.prefix_cache_queries == 0
    manager.free(FakeRequest("a", prompt))
    assert manager.num_free_blocks == 8


class Simulation:
    """Random scheduler-like load; a fake KV store checks that every table reads its own tokens."""

    def __init__(self, seed: int, num_blocks: int = 48):
        self.rng = random.Random(seed)
        self.manager = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK_SIZE)
        self.kv: dict[int, list[int | None]] = {i: [None] * BLOCK_SIZE for i in range(num_blocks)}
        self.prefixes = [[self.rng.randrange(50) for _ in range(n)] for n in (3, 4, 8, 9, 13)]
        self.live: dict[str, FakeRequest] = {}
        self.next_id = 0

    def write_kv(self, request: FakeRequest, start: int, end: int) -> None:
        """The runner writes KV for positions [start, end) of the request."""
        block_ids = self.manager.get_block_ids(request.request_id)
        tokens = request.all_token_ids
        for pos in range(start, min(end, len(tokens))):
            self.kv[block_ids[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] = tokens[pos]

    def add_request(self, num_siblings: int) -> None:
        prompt = list(self.rng.choice(self.prefixes)) + [
            self.rng.randrange(50) for _ in range(self.rng.randrange(0, 7))
        ]
        if not prompt:
            prompt = [1]
        for _ in range(num_siblings):
            request = FakeRequest(f"r{self.next_id}", list(prompt))
            self.next_id += 1
            hit_blocks, num_hit_tokens = self.manager.get_computed_blocks(request)
            assert num_hit_tokens <= request.num_tokens - 1
            # The hit blocks really hold this request's prefix.
            for i, block in enumerate(hit_blocks):
                assert self.kv[block.block_id] == request.all_token_ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            remaining = request.num_tokens - num_hit_tokens
            chunk = remaining if self.rng.random() < 0.7 else self.rng.randint(1, remaining)
            if self.manager.allocate_slots(request, chunk, hit_blocks) is None:
                self.manager.free(request)  # dropped (not admitted): must leave nothing behind
                continue
            start = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens + chunk
            self.write_kv(request, start, request.num_computed_tokens)
            self.live[request.request_id] = request

    def step(self, request: FakeRequest) -> None:
        """Continue a prefill chunk or decode one token."""
        if request.num_computed_tokens < request.num_tokens:
            num_new = self.rng.randint(1, request.num_tokens - request.num_computed_tokens)
        else:
            request.output_token_ids.append(self.rng.randrange(50))
            num_new = 1
        if self.manager.allocate_slots(request, num_new) is None:
            self.preempt(request)
            return
        start = request.num_computed_tokens
        request.num_computed_tokens += num_new
        self.write_kv(request, start, request.num_computed_tokens)

    def preempt(self, request: FakeRequest) -> None:
        self.manager.free(request)
        del self.live[request.request_id]

    def random_op(self) -> None:
        op = self.rng.random()
        if op < 0.3 or not self.live:
            self.add_request(num_siblings=self.rng.choice([1, 1, 1, 2, 3]))
        elif op < 0.8:
            self.step(self.rng.choice(list(self.live.values())))
        else:  # finished or aborted
            self.preempt(self.rng.choice(list(self.live.values())))

    def check_invariants(self) -> None:
        manager, pool = self.manager, self.manager.block_pool
        assert set(manager.req_to_blocks) == set(self.live)
        tables = {rid: manager.req_to_blocks[rid] for rid in self.live}
        assert sum(b.ref_cnt for b in pool.blocks) == sum(len(t) for t in tables.values())
        num_referenced = sum(1 for b in pool.blocks if b.ref_cnt > 0)
        free_blocks = list(pool.free_block_queue)
        assert len(free_blocks) == pool.num_free_blocks
        assert len({b.block_id for b in free_blocks}) == len(free_blocks)
        assert all(b.ref_cnt == 0 for b in free_blocks)
        assert pool.num_free_blocks + num_referenced == manager.num_blocks
        holders: dict[int, int] = {}
        for rid, table in tables.items():
            assert len({b.block_id for b in table}) == len(table)
            for block in table:
                holders[block.block_id] = holders.get(block.block_id, 0) + 1
            # The table covers its computed tokens, and the fake KV holds exactly those tokens.
            request = self.live[rid]
            assert len(table) * BLOCK_SIZE >= request.num_computed_tokens
            tokens = request.all_token_ids
            for pos in range(request.num_computed_tokens):
                assert self.kv[table[pos // BLOCK_SIZE].block_id][pos % BLOCK_SIZE] == tokens[pos]
        for block in pool.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0)
            if holders.get(block.block_id, 0) > 1:
                assert block.block_hash is not None  # only cached full blocks are shared
        for block_hash, block in pool.cached_blocks.items():
            assert block.block_hash == block_hash
        assert sum(1 for b in pool.blocks if b.block_hash is not None) == len(pool.cached_blocks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_invariants(seed):
    sim = Simulation(seed)
    for _ in range(1000):
        sim.random_op()
        sim.check_invariants()
    manager = sim.manager
    assert manager.prefix_cache_hits > 0  # the load did exercise sharing
    assert manager.block_pool.cached_blocks
    for request in list(sim.live.values()):
        sim.preempt(request)
    sim.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    assert all(b.ref_cnt == 0 for b in manager.block_pool.blocks)
    assert not manager.req_to_blocks and not manager.req_to_block_hashes and not manager.num_cached_blocks
    assert manager.reset_prefix_cache()
