"""PageManager / KVCache: unit tests per method and a stateful property test.

The property test drives random operation sequences against a simulated pool (a numpy array
``[num_pages, page_size]`` of token values): copy-on-write copies are applied to it, every write
stores fresh values through the slot mapping, unreferenced pages are poisoned, and after every
step each sequence must read back exactly what it wrote at every position ``< num_tokens``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tandem_rt.paged import KVCache, OutOfPagesError, PageManager, copy_indices, pages_for_memory

from conftest import tiny_tandem_config


def ref_slots(table, page_size, start, end):
    """Plain per-position reference of the slot mapping."""
    return [table[p // page_size] * page_size + p % page_size for p in range(start, end)]


def table_counts(pm):
    counts = [0] * pm.num_pages
    for sid in pm.seq_ids():
        for p in pm.page_table(sid):
            counts[p] += 1
    return counts


def snapshot(pm):
    seqs = {sid: (pm.page_table(sid), pm.num_tokens(sid), pm.primary_len(sid), pm.secondary_len(sid))
            for sid in pm.seq_ids()}
    return seqs, [pm.refcount(p) for p in range(pm.num_pages)], list(pm._free)


# ---------------------------------------------------------------------------- construction
def test_constructor_validates():
    with pytest.raises(ValueError, match="num_pages"):
        PageManager(0, 4)
    with pytest.raises(ValueError, match="page_size"):
        PageManager(4, 0)
    with pytest.raises(ValueError, match="page_size"):
        PageManager(4, 2.5)
    pm = PageManager(5, 3)
    assert (pm.num_pages, pm.page_size, pm.num_free_pages, pm.num_sequences) == (5, 3, 5, 0)


def test_add_sequence():
    pm = PageManager(4, 4)
    pm.add_sequence(7)
    assert pm.has_sequence(7) and not pm.has_sequence(8)
    assert pm.num_tokens(7) == 0 and pm.page_table(7) == [] and pm.num_free_pages == 4
    with pytest.raises(ValueError, match="seq_id"):
        pm.add_sequence(7)
    with pytest.raises(ValueError, match="seq_id"):
        pm.num_tokens(8)
    with pytest.raises(ValueError, match="seq_id"):
        pm.add_sequence([1])
    with pytest.raises(ValueError, match=r"seq_ids\[0\]"):
        pm.batch_slot_mapping([[1]], [0], [0])


# ---------------------------------------------------------------------------- prepare_write
def test_prepare_write_allocates_and_maps_slots():
    pm = PageManager(8, 4)
    pm.add_sequence(0)
    assert pm.pages_needed(0, 0, 5) == 2
    assert pm.prepare_write(0, 0, 5) == []
    assert pm.num_tokens(0) == 5 and len(pm.page_table(0)) == 2 and pm.num_free_pages == 6
    # Grow across a page boundary, then write inside the existing range (no allocation).
    assert pm.prepare_write(0, 5, 13) == []
    assert pm.num_tokens(0) == 13 and len(pm.page_table(0)) == 4 and pm.num_free_pages == 4
    assert pm.pages_needed(0, 2, 9) == 0
    assert pm.prepare_write(0, 2, 9) == [] and pm.num_tokens(0) == 13
    table = pm.page_table(0)
    assert len(set(table)) == 4
    for start, end in [(0, 13), (3, 4), (4, 8), (7, 13), (13, 13)]:
        assert pm.slot_mapping(0, start, end) == ref_slots(table, 4, start, end)
    pm.check_invariants()


def test_prepare_write_empty_range_is_noop():
    pm = PageManager(2, 4)
    pm.add_sequence(0)
    pm.prepare_write(0, 0, 3)
    before = snapshot(pm)
    assert pm.prepare_write(0, 3, 3) == [] and pm.pages_needed(0, 3, 3) == 0
    assert snapshot(pm) == before


@pytest.mark.parametrize("start,end,name", [(-1, 2, "start"), (3, 2, "end"), (6, 8, "start"), (1.5, 3, "start")])
def test_prepare_write_rejects_bad_ranges(start, end, name):
    pm = PageManager(8, 4)
    pm.add_sequence(0)
    pm.prepare_write(0, 0, 5)
    before = snapshot(pm)
    with pytest.raises(ValueError, match=name):
        pm.prepare_write(0, start, end)
    with pytest.raises(ValueError, match=name):
        pm.pages_needed(0, start, end)
    assert snapshot(pm) == before
    with pytest.raises(ValueError, match="seq_id"):
        pm.prepare_write(1, 0, 1)


def test_out_of_pages_changes_nothing():
    pm = PageManager(5, 4)
    for sid in range(2):
        pm.add_sequence(sid)
        pm.prepare_write(sid, 0, 6)
    pm.fork(0, 2)
    pm.set_primary_len(1, 4)
    before = snapshot(pm)
    assert pm.num_free_pages == 1
    with pytest.raises(OutOfPagesError, match="needs 2") as info:
        pm.prepare_write(1, 6, 16)
    assert (info.value.needed, info.value.free) == (2, 1)
    assert snapshot(pm) == before
    # Copy-on-write of the two shared pages plus one new page also does not fit.
    with pytest.raises(OutOfPagesError):
        pm.prepare_write(2, 0, 9)
    assert snapshot(pm) == before
    pm.check_invariants()
    # The manager keeps working after the error.
    assert pm.prepare_write(1, 6, 12) == [] and pm.num_free_pages == 0


# ---------------------------------------------------------------------------- fork / copy-on-write
def test_fork_shares_pages_and_lengths():
    pm = PageManager(8, 4)
    pm.add_sequence("a")
    pm.prepare_write("a", 0, 6)
    pm.set_primary_len("a", 6)
    pm.set_secondary_len("a", 5)
    pm.fork("a", "b")
    assert pm.page_table("b") == pm.page_table("a")
    assert (pm.num_tokens("b"), pm.primary_len("b"), pm.secondary_len("b")) == (6, 6, 5)
    assert [pm.refcount(p) for p in pm.page_table("a")] == [2, 2]
    assert pm.num_free_pages == 6
    with pytest.raises(ValueError, match="child_id"):
        pm.fork("a", "b")
    with pytest.raises(ValueError, match="parent_id"):
        pm.fork("zz", "c")


def test_copy_on_write_copies_only_touched_shared_pages():
    pm = PageManager(8, 4)
    pm.add_sequence(0)
    pm.prepare_write(0, 0, 10)          # pages t0 t1 t2 (t2 partial: positions 8, 9)
    t = pm.page_table(0)
    pm.fork(0, 1)
    # Child appends into the shared partial last page and one new page.
    assert pm.pages_needed(1, 10, 13) == 2
    copies = pm.prepare_write(1, 10, 13)
    child = pm.page_table(1)
    assert copies == [(t[2], child[2])]
    assert child[:2] == t[:2] and child[2] not in t and len(child) == 4
    assert pm.page_table(0) == t and pm.num_tokens(0) == 10 and pm.num_tokens(1) == 13
    assert [pm.refcount(p) for p in t] == [2, 2, 1]
    # Parent rewrites position 5 (shared page 1): it gets its own copy, the child keeps t1.
    assert pm.prepare_write(0, 5, 6) == [(t[1], pm.page_table(0)[1])]
    assert pm.page_table(1)[1] == t[1] and pm.refcount(t[1]) == 1
    # Nothing shared any more in that range: no further copies.
    assert pm.prepare_write(0, 4, 10) == []
    pm.check_invariants()


def test_copy_pages_op_applies_copy_on_write_to_both_pools():
    """End to end with the native copy_pages op on two KVCache pools sharing one page table."""
    torch.manual_seed(0)
    P, H, D = 4, 2, 3
    pm = PageManager(6, P)
    caches = [KVCache(2, 6, P, H, D, torch.float32), KVCache(1, 6, P, 1, D, torch.float32)]

    def write(sid, start, end):
        src, dst = copy_indices(pm.prepare_write(sid, start, end))
        torch.ops.tandem_rt.copy_pages([t for c in caches for t in c.tensors()], src, dst)
        slots = torch.tensor(pm.slot_mapping(sid, start, end))
        vals = []
        for c in caches:
            for t in c.tensors():
                v = torch.randn(end - start, *t.shape[2:])
                t.view(-1, *t.shape[2:])[slots] = v
                vals.append(v)
        return vals

    def read(sid, start, end):
        slots = torch.tensor(pm.slot_mapping(sid, start, end))
        return [t.view(-1, *t.shape[2:])[slots] for c in caches for t in c.tensors()]

    pm.add_sequence(0)
    prefix = write(0, 0, 6)
    pm.fork(0, 1)
    child_tail = write(1, 5, 9)         # overwrites shared position 5 in the child only
    parent_tail = write(0, 6, 8)
    for got, want in zip(read(0, 0, 6), prefix):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, p, c in zip(read(1, 0, 9), prefix, child_tail):
        torch.testing.assert_close(got, torch.cat([p[:5], c]), rtol=0, atol=0)
    for got, want in zip(read(0, 6, 8), parent_tail):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------- truncate / free
def test_truncate_releases_pages_and_clamps_lengths():
    pm = PageManager(8, 4)
    pm.add_sequence(0)
    pm.prepare_write(0, 0, 11)
    pm.set_primary_len(0, 11)
    pm.set_secondary_len(0, 7)
    t = pm.page_table(0)
    pm.truncate(0, 8)                   # exactly two pages remain
    assert pm.page_table(0) == t[:2] and pm.num_tokens(0) == 8 and pm.num_free_pages == 6
    assert (pm.primary_len(0), pm.secondary_len(0)) == (8, 7)
    pm.truncate(0, 5)
    assert pm.page_table(0) == t[:2] and (pm.primary_len(0), pm.secondary_len(0)) == (5, 5)
    with pytest.raises(ValueError, match="new_len"):
        pm.truncate(0, 6)
    with pytest.raises(ValueError, match="new_len"):
        pm.truncate(0, -1)
    pm.truncate(0, 0)
    assert pm.page_table(0) == [] and pm.num_free_pages == 8
    # Freed pages are handed out again in table order.
    pm.prepare_write(0, 0, 8)
    assert pm.page_table(0) == t[:2]
    pm.check_invariants()


def test_truncate_and_free_keep_shared_pages():
    pm = PageManager(8, 4)
    pm.add_sequence(0)
    pm.prepare_write(0, 0, 8)
    t = pm.page_table(0)
    pm.fork(0, 1)
    pm.truncate(1, 2)
    assert pm.page_table(1) == t[:1] and [pm.refcount(p) for p in t] == [2, 1]
    pm.free(0)
    assert not pm.has_sequence(0) and pm.refcount(t[0]) == 1 and pm.refcount(t[1]) == 0
    assert pm.num_free_pages == 7
    with pytest.raises(ValueError, match="seq_id"):
        pm.free(0)
    pm.free(1)
    assert pm.num_free_pages == 8 and pm.num_sequences == 0
    pm.check_invariants()


# ---------------------------------------------------------------------------- lengths
def test_length_setters_validate():
    pm = PageManager(4, 4)
    pm.add_sequence(0)
    pm.prepare_write(0, 0, 6)
    pm.set_primary_len(0, 6)
    pm.set_secondary_len(0, 0)
    assert (pm.primary_len(0), pm.secondary_len(0)) == (6, 0)
    for setter in (pm.set_primary_len, pm.set_secondary_len):
        with pytest.raises(ValueError, match="n must be"):
            setter(0, 7)
        with pytest.raises(ValueError, match="n must be"):
            setter(0, -1)
        with pytest.raises(ValueError, match="seq_id"):
            setter(1, 0)


# ---------------------------------------------------------------------------- kernel inputs
def test_block_table_and_batch_slot_mapping():
    P = 4
    pm = PageManager(16, P)
    lens = {10: 9, 11: 1, 12: 0, 13: 16}
    for sid, n in lens.items():
        pm.add_sequence(sid)
        pm.prepare_write(sid, 0, n)
    ids = [13, 10, 12, 11]
    bt = pm.block_table(ids)
    assert bt.dtype == torch.int32 and bt.shape == (4, 4) and bt.device.type == "cpu"
    for row, sid in zip(bt.tolist(), ids):
        t = pm.page_table(sid)
        assert row == t + [0] * (4 - len(t))
    assert pm.block_table(ids, max_pages=6).shape == (4, 6)
    assert pm.block_table([12]).shape == (1, 1)
    with pytest.raises(ValueError, match="max_pages"):
        pm.block_table(ids, max_pages=3)
    with pytest.raises(ValueError, match=r"seq_ids\[1\]"):
        pm.block_table([10, 99])

    starts, ends = [3, 8, 0, 0], [16, 9, 0, 1]
    sm = pm.batch_slot_mapping(ids, starts, ends)
    want = sum((ref_slots(pm.page_table(s), P, a, b) for s, a, b in zip(ids, starts, ends)), [])
    assert sm.dtype == torch.int64 and sm.tolist() == want
    assert pm.batch_slot_mapping([], [], []).shape == (0,)
    with pytest.raises(ValueError, match="starts"):
        pm.batch_slot_mapping(ids, starts[:3], ends)
    with pytest.raises(ValueError, match="ends"):
        pm.batch_slot_mapping(ids, starts, ends[:3])
    with pytest.raises(ValueError, match="end"):
        pm.batch_slot_mapping([10], [0], [10])
    with pytest.raises(ValueError, match="start"):
        pm.slot_mapping(10, -1, 2)
    with pytest.raises(ValueError, match="end"):
        pm.slot_mapping(10, 5, 4)


def test_check_invariants_detects_corruption():
    pm = PageManager(6, 2)
    pm.add_sequence(0)
    pm.prepare_write(0, 0, 3)
    pm.check_invariants()
    pm._refcount[pm.page_table(0)[0]] += 1
    with pytest.raises(AssertionError, match="reference counts"):
        pm.check_invariants()
    pm._refcount[pm.page_table(0)[0]] -= 1
    pm._free.append(pm._free[0])
    with pytest.raises(AssertionError, match="twice"):
        pm.check_invariants()
    pm._free.pop()
    leaked = pm._free.pop()
    with pytest.raises(AssertionError, match="free list"):
        pm.check_invariants()
    pm._free.append(leaked)
    pm._seqs[0].num_tokens = 5
    with pytest.raises(AssertionError, match="pages for 5 tokens"):
        pm.check_invariants()


# ---------------------------------------------------------------------------- property test
class PageManagerMachine(RuleBasedStateMachine):
    """Random add / write (with copy-on-write) / fork / truncate / free / length updates."""

    @initialize(num_pages=st.integers(2, 12), page_size=st.integers(1, 4), prefix=st.integers(0, 9))
    def setup(self, num_pages, page_size, prefix):
        self.pm = PageManager(num_pages, page_size)
        self.P = page_size
        self.pool = np.full((num_pages, page_size), -1, dtype=np.int64)
        self.model: dict[int, list[int]] = {}      # seq id -> token values written at 0..n-1
        self.lens: dict[int, list[int]] = {}       # seq id -> [primary_len, secondary_len]
        self.next_id = 0
        self.next_value = 0
        self.add()
        self.add()
        self._write(0, 0, prefix)

    def _pick(self, data):
        return data.draw(st.sampled_from(sorted(self.model)))

    @rule()
    def add(self):
        sid = self.next_id
        self.next_id += 1
        self.pm.add_sequence(sid)
        self.model[sid] = []
        self.lens[sid] = [0, 0]

    def _write(self, sid, start, end) -> bool:
        """prepare_write + copy-on-write copies + fresh values through the slot mapping.
        Returns False (after checking that nothing changed) when the pages run out."""
        table = self.pm.page_table(sid)
        counts = table_counts(self.pm)
        touched = range(start // self.P, min(-(-end // self.P), len(table))) if end > start else range(0)
        expect_copies = [i for i in touched if counts[table[i]] > 1]
        expect_needed = len(expect_copies) + max(0, -(-end // self.P) - len(table))
        assert self.pm.pages_needed(sid, start, end) == expect_needed
        free_before = self.pm.num_free_pages
        if expect_needed > free_before:
            before = snapshot(self.pm)
            with pytest.raises(OutOfPagesError):
                self.pm.prepare_write(sid, start, end)
            assert snapshot(self.pm) == before
            return False
        copies = self.pm.prepare_write(sid, start, end)
        assert free_before - self.pm.num_free_pages == expect_needed
        assert [src for src, _ in copies] == [table[i] for i in expect_copies]
        for src, dst in copies:
            assert counts[dst] == 0, "copy-on-write target page was in use"
            self.pool[dst] = self.pool[src]
        values = list(range(self.next_value, self.next_value + end - start))
        self.next_value += end - start
        slots = self.pm.slot_mapping(sid, start, end)
        self.pool.reshape(-1)[slots] = values
        self.model[sid][start:end] = values
        return True

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def write(self, data):
        sid = self._pick(data)
        n = len(self.model[sid])
        start = data.draw(st.integers(0, n), label="start")
        end = start + data.draw(st.integers(0, 3 * self.P + 1), label="length")
        self._write(sid, start, end)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def speculative_step(self, data):
        """An engine step: append k draft positions, mark them written, roll back to the accepted ones."""
        sid = self._pick(data)
        n = len(self.model[sid])
        k = data.draw(st.integers(1, 5), label="k")
        if not self._write(sid, n, n + k):
            return
        self.pm.set_primary_len(sid, n + k)
        self.pm.set_secondary_len(sid, n + k - 1)
        accepted = data.draw(st.integers(0, k), label="accepted")
        self.pm.truncate(sid, n + accepted)
        del self.model[sid][n + accepted:]
        self.lens[sid] = [n + accepted, min(n + k - 1, n + accepted)]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data)
        child = self.next_id
        self.next_id += 1
        self.pm.fork(parent, child)
        self.model[child] = list(self.model[parent])
        self.lens[child] = list(self.lens[parent])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data):
        sid = self._pick(data)
        new_len = data.draw(st.integers(0, len(self.model[sid])), label="new_len")
        self.pm.truncate(sid, new_len)
        del self.model[sid][new_len:]
        self.lens[sid] = [min(x, new_len) for x in self.lens[sid]]

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data())
    def free(self, data):
        sid = self._pick(data)
        self.pm.free(sid)
        del self.model[sid], self.lens[sid]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def set_lens(self, data):
        sid = self._pick(data)
        n = len(self.model[sid])
        p, s = data.draw(st.integers(0, n)), data.draw(st.integers(0, n))
        self.pm.set_primary_len(sid, p)
        self.pm.set_secondary_len(sid, s)
        self.lens[sid] = [p, s]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def invalid_request(self, data):
        sid = self._pick(data)
        n = len(self.model[sid])
        before = snapshot(self.pm)
        kind = data.draw(st.sampled_from(["start", "order", "truncate", "len", "unknown"]))
        with pytest.raises(ValueError):
            if kind == "start":
                self.pm.prepare_write(sid, n + 1, n + 2)
            elif kind == "order":
                self.pm.prepare_write(sid, n, n - 1)
            elif kind == "truncate":
                self.pm.truncate(sid, n + 1)
            elif kind == "len":
                self.pm.set_primary_len(sid, n + 1)
            else:
                self.pm.prepare_write(self.next_id + 100, 0, 1)
        assert snapshot(self.pm) == before

    @invariant()
    def consistent(self):
        pm = self.pm
        pm.check_invariants()
        counts = table_counts(pm)
        assert [pm.refcount(p) for p in range(pm.num_pages)] == counts, "reference counts not exact"
        free = pm._free
        assert len(set(free)) == len(free), "a page is free twice"
        assert set(free) == {p for p in range(pm.num_pages) if counts[p] == 0}, "a page leaked"
        assert pm.num_free_pages == len(free)
        assert sorted(pm.seq_ids()) == sorted(self.model)
        # Poison every page no sequence holds: a stale reference would read -1.
        self.pool[[p for p in range(pm.num_pages) if counts[p] == 0]] = -1
        flat = self.pool.reshape(-1)
        for sid, values in self.model.items():
            n = len(values)
            assert pm.num_tokens(sid) == n
            assert [pm.primary_len(sid), pm.secondary_len(sid)] == self.lens[sid]
            table = pm.page_table(sid)
            assert len(table) == -(-n // self.P)
            slots = pm.slot_mapping(sid, 0, n)
            assert slots == ref_slots(table, self.P, 0, n)
            assert flat[slots].tolist() == values, f"sequence {sid} does not read back what it wrote"
        ids = sorted(self.model)
        if ids:
            ends = [len(self.model[s]) for s in ids]
            sm = pm.batch_slot_mapping(ids, [0] * len(ids), ends)
            assert sm.tolist() == sum((pm.slot_mapping(s, 0, e) for s, e in zip(ids, ends)), [])
            bt = pm.block_table(ids)
            for row, sid in zip(bt.tolist(), ids):
                t = pm.page_table(sid)
                assert row[:len(t)] == t and not any(row[len(t):])

    def teardown(self):
        if not hasattr(self, "pm"):
            return
        for sid in list(self.model):
            self.pm.free(sid)
        assert self.pm.num_free_pages == self.pm.num_pages
        assert all(self.pm.refcount(p) == 0 for p in range(self.pm.num_pages))


PageManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
test_page_manager_state_machine = PageManagerMachine.TestCase


# ---------------------------------------------------------------------------- KVCache / budget
@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2), ("float16", 2)])
def test_kv_cache_shapes_and_dtypes(dtype, itemsize):
    L, N, P, H, D = 3, 5, 4, 2, 8
    cache = KVCache(L, N, P, H, D, dtype, "cpu")
    want_dtype = torch.float16 if dtype == "float16" else dtype
    assert len(cache.k) == len(cache.v) == L and len(cache.tensors()) == 2 * L
    for t in cache.tensors():
        assert t.shape == (N, P, H, D) and t.dtype == want_dtype and t.device.type == "cpu"
        assert t.is_contiguous() and not t.any()
    assert cache.tensors() == cache.k + cache.v
    # Every tensor owns distinct memory.
    for i, t in enumerate(cache.tensors()):
        t.fill_(i + 1)
    assert [int(t.float().mean()) for t in cache.tensors()] == list(range(1, 2 * L + 1))
    # Hand computation: 2 (K, V) * L * P * H * D * itemsize.
    assert KVCache.bytes_per_page(L, P, H, D, dtype) == 2 * 3 * 4 * 2 * 8 * itemsize
    assert KVCache.bytes_per_page(L, P, H, D, dtype) == sum(t[0].nbytes for t in cache.tensors())
    assert cache.nbytes == N * KVCache.bytes_per_page(L, P, H, D, dtype)


def test_kv_cache_validates():
    with pytest.raises(ValueError, match="num_layers"):
        KVCache(0, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="head_dim"):
        KVCache(1, 4, 4, 2, -8)
    with pytest.raises(ValueError, match="dtype"):
        KVCache(1, 4, 4, 2, 8, torch.int32)
    with pytest.raises(ValueError, match="dtype"):
        KVCache.bytes_per_page(1, 4, 2, 8, "float64x")


def test_kv_cache_for_model_and_pages_for_memory():
    cfg = tiny_tandem_config()
    primary, secondary = cfg.primary, cfg.secondary
    # primary: 4 layers, 2 KV heads, head_dim 48/4 = 12; secondary: 2 layers, 1 KV head, head_dim 8.
    assert (primary.num_hidden_layers, primary.num_key_value_heads, primary.head_dim) == (4, 2, 12)
    assert (secondary.num_hidden_layers, secondary.num_key_value_heads, secondary.head_dim) == (2, 1, 8)
    per_page_fp32 = 2 * 4 * 16 * 2 * 12 * 4 + 2 * 2 * 16 * 1 * 8 * 4      # 12288 + 2048 = 14336
    assert pages_for_memory(10 * per_page_fp32 + per_page_fp32 - 1, 16, [primary, secondary],
                            torch.float32) == 10
    assert pages_for_memory(per_page_fp32 // 2 * 7, 16, [primary, secondary], torch.bfloat16) == 7
    assert pages_for_memory(12288 * 3, 16, [primary], torch.float32) == 3
    assert pages_for_memory(0, 16, [primary], torch.float32) == 0
    with pytest.raises(ValueError, match="memory_bytes"):
        pages_for_memory(-1, 16, [primary], torch.float32)
    with pytest.raises(ValueError, match="model_cfgs"):
        pages_for_memory(100, 16, [], torch.float32)
    with pytest.raises(ValueError, match="page_size"):
        pages_for_memory(100, 0, [primary], torch.float32)
    cache = KVCache.for_model(secondary, 3, 16, torch.float32)
    assert cache.k[0].shape == (3, 16, 1, 8) and len(cache.v) == 2
