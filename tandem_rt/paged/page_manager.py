"""Host-side bookkeeping of the paged KV cache: page tables, reference counts, free list.

One :class:`PageManager` owns one page pool that the primary and the secondary KV pools share:
a sequence has ONE page table and both pools index the same token positions with it, so
allocation, fork, rollback and freeing happen once per sequence and stay consistent for both
models. Token position ``pos`` of a sequence lives in page ``table[pos // page_size]`` at
offset ``pos % page_size``; its *slot* (row of a pool viewed as ``[num_pages * page_size, ...]``)
is ``table[pos // page_size] * page_size + pos % page_size``.

Pages are reference counted. :meth:`PageManager.fork` shares every page of the parent with the
child; a later :meth:`PageManager.prepare_write` into a shared page gives the writer a private
copy (copy-on-write) and returns the ``(src_page, dst_page)`` pairs that the caller copies with
``tandem_rt.ops.copy_pages`` over every layer of both pools *before* writing.

Every per-step operation costs O(pages touched): the free list is a stack, reference counts a
list, slot mappings are built one page at a time with ``range`` (no per-token Python loop).
"""
from __future__ import annotations

from array import array
from typing import Hashable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["OutOfPagesError", "PageManager", "copy_indices"]

# Page tables are array('i') (int32 on every supported platform) so that block tables are built
# with memcpy-speed concatenation instead of per-element conversion.
assert array("i").itemsize == 4 and array("q").itemsize == 8


class OutOfPagesError(RuntimeError):
    """Not enough free pages for the request; raised before any state changes.

    Attributes ``needed`` and ``free`` give the page counts (for preemption decisions).
    """

    def __init__(self, message: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


class _Seq:
    __slots__ = ("table", "num_tokens", "primary_len", "secondary_len")

    def __init__(self, table: list, num_tokens: int, primary_len: int, secondary_len: int) -> None:
        self.table = table              # array('i') of page ids, len == ceil(num_tokens / page_size)
        self.num_tokens = num_tokens
        self.primary_len = primary_len
        self.secondary_len = secondary_len


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value.__index__()


class PageManager:
    """Page tables of all live sequences over one pool of ``num_pages`` pages of ``page_size`` tokens.

    Args:
        num_pages: pages in the pool (the page dimension of every K/V pool tensor).
        page_size: token positions per page.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        num_pages = _check_int(num_pages, "num_pages")
        page_size = _check_int(page_size, "page_size")
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Stack: pop() hands out the lowest free page id first on a fresh manager.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refcount: list[int] = [0] * num_pages
        self._seqs: dict[Hashable, _Seq] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_pages(self) -> int:
        """Pages currently on the free list."""
        return len(self._free)

    @property
    def num_sequences(self) -> int:
        """Live sequences."""
        return len(self._seqs)

    def seq_ids(self) -> list:
        """Ids of the live sequences, in insertion order."""
        return list(self._seqs)

    def has_sequence(self, seq_id) -> bool:
        """Whether ``seq_id`` is a live sequence."""
        try:
            return seq_id in self._seqs
        except TypeError:
            return False

    def _get(self, seq_id, name: str = "seq_id") -> _Seq:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"{name}: unknown sequence id {seq_id!r}") from None

    def num_tokens(self, seq_id) -> int:
        """Positions ``0 .. num_tokens-1`` of the sequence have a slot."""
        return self._get(seq_id).num_tokens

    def page_table(self, seq_id) -> list[int]:
        """A copy of the sequence's page table (page ids, ``ceil(num_tokens / page_size)`` of them)."""
        return self._get(seq_id).table.tolist()

    def refcount(self, page: int) -> int:
        """Number of page tables holding ``page`` (0 for a free page)."""
        page = _check_int(page, "page")
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page must be in [0, {self.num_pages}), got {page}")
        return self._refcount[page]

    # ------------------------------------------------------------------ lifecycle
    def add_sequence(self, seq_id) -> None:
        """Register a new empty sequence (no pages). ValueError if ``seq_id`` is already live."""
        try:
            hash(seq_id)
        except TypeError:
            raise ValueError(f"seq_id must be hashable, got {seq_id!r}") from None
        if seq_id in self._seqs:
            raise ValueError(f"seq_id: sequence {seq_id!r} already exists")
        self._seqs[seq_id] = _Seq(array("i"), 0, 0, 0)

    def fork(self, parent_id, child_id) -> None:
        """Create ``child_id`` sharing every page of ``parent_id`` (reference counts +1).

        The child starts with the parent's ``num_tokens``, ``primary_len`` and ``secondary_len``.
        No data is copied now; :meth:`prepare_write` copies a shared page when either sequence
        writes into it.
        """
        parent = self._get(parent_id, "parent_id")
        try:
            hash(child_id)
        except TypeError:
            raise ValueError(f"child_id must be hashable, got {child_id!r}") from None
        if child_id in self._seqs:
            raise ValueError(f"child_id: sequence {child_id!r} already exists")
        rc = self._refcount
        for p in parent.table:
            rc[p] += 1
        self._seqs[child_id] = _Seq(parent.table[:], parent.num_tokens, parent.primary_len,
                                    parent.secondary_len)

    def free(self, seq_id) -> None:
        """Drop the sequence; pages whose reference count reaches 0 return to the free list."""
        seq = self._get(seq_id)
        self._release(seq.table, 0)
        del self._seqs[seq_id]

    def truncate(self, seq_id, new_len: int) -> None:
        """Roll the sequence back to ``new_len`` positions (pure bookkeeping, no data moves).

        Pages wholly past ``new_len`` are released; ``primary_len`` and ``secondary_len`` are
        clamped to ``new_len``. Requires ``0 <= new_len <= num_tokens``.
        """
        seq = self._get(seq_id)
        new_len = _check_int(new_len, "new_len")
        if not 0 <= new_len <= seq.num_tokens:
            raise ValueError(f"new_len must be in [0, num_tokens={seq.num_tokens}] for sequence {seq_id!r}, "
                             f"got {new_len}")
        P = self.page_size
        self._release(seq.table, (new_len + P - 1) // P)
        seq.num_tokens = new_len
        if seq.primary_len > new_len:
            seq.primary_len = new_len
        if seq.secondary_len > new_len:
            seq.secondary_len = new_len

    def _release(self, table: list, keep: int) -> None:
        """Decref ``table[keep:]`` and cut it off; freed pages go on the stack so that the next
        allocation takes them back in table order."""
        if keep >= len(table):
            return
        rc = self._refcount
        free = self._free
        for p in reversed(table[keep:]):
            c = rc[p] - 1
            rc[p] = c
            if c == 0:
                free.append(p)
        del table[keep:]

    # ------------------------------------------------------------------ writes
    def _write_plan(self, seq: _Seq, seq_id, start, end):
        """Validate a write range; return (start, end, shared page indices, new page count)."""
        start = _check_int(start, "start")
        end = _check_int(end, "end")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if end < start:
            raise ValueError(f"end ({end}) must be >= start ({start})")
        if start > seq.num_tokens:
            raise ValueError(f"start ({start}) must be <= num_tokens ({seq.num_tokens}) of sequence {seq_id!r}")
        P = self.page_size
        table = seq.table
        have = len(table)
        last = (end + P - 1) // P
        if start == end:
            return start, end, (), 0
        rc = self._refcount
        shared = [i for i in range(start // P, min(last, have)) if rc[table[i]] > 1]
        return start, end, shared, (last - have if last > have else 0)

    def pages_needed(self, seq_id, start: int, end: int) -> int:
        """Free pages that ``prepare_write(seq_id, start, end)`` would take (new + copy-on-write)."""
        seq = self._get(seq_id)
        _, _, shared, new = self._write_plan(seq, seq_id, start, end)
        return len(shared) + new

    def prepare_write(self, seq_id, start: int, end: int) -> list[tuple[int, int]]:
        """Make positions ``[start, end)`` writable for the sequence.

        Allocates the pages missing past the current end (``end`` may exceed ``num_tokens``;
        ``start <= num_tokens``) and gives the sequence a private copy of every page in the range
        that another sequence also holds (reference count > 1). Sets
        ``num_tokens = max(num_tokens, end)``.

        Returns:
            ``[(src_page, dst_page), ...]``: the page copies the caller must run with
            ``tandem_rt.ops.copy_pages`` over every K/V tensor of both pools before writing
            (see :func:`copy_indices`). Empty when nothing is shared.

        Raises:
            OutOfPagesError: not enough free pages; nothing was changed.
            ValueError: unknown ``seq_id``, ``start < 0``, ``end < start``, ``start > num_tokens``.
        """
        seq = self._get(seq_id)
        start, end, shared, new = self._write_plan(seq, seq_id, start, end)
        free = self._free
        need = len(shared) + new
        if need > len(free):
            raise OutOfPagesError(
                f"sequence {seq_id!r} needs {need} free page(s) to write positions [{start}, {end}) "
                f"({new} new, {len(shared)} copy-on-write) but only {len(free)} of {self.num_pages} are free",
                need, len(free))
        rc = self._refcount
        table = seq.table
        copies = []
        for i in shared:
            src = table[i]
            dst = free.pop()
            rc[src] -= 1
            rc[dst] = 1
            table[i] = dst
            copies.append((src, dst))
        for _ in range(new):
            p = free.pop()
            rc[p] = 1
            table.append(p)
        if end > seq.num_tokens:
            seq.num_tokens = end
        return copies

    # ------------------------------------------------------------------ lengths
    def primary_len(self, seq_id) -> int:
        """Positions whose primary K/V has been written."""
        return self._get(seq_id).primary_len

    def secondary_len(self, seq_id) -> int:
        """Positions whose secondary K/V has been written."""
        return self._get(seq_id).secondary_len

    def set_primary_len(self, seq_id, n: int) -> None:
        """Set ``primary_len``; requires ``0 <= n <= num_tokens``."""
        seq = self._get(seq_id)
        seq.primary_len = self._check_len(seq, seq_id, n)

    def set_secondary_len(self, seq_id, n: int) -> None:
        """Set ``secondary_len``; requires ``0 <= n <= num_tokens``."""
        seq = self._get(seq_id)
        seq.secondary_len = self._check_len(seq, seq_id, n)

    @staticmethod
    def _check_len(seq: _Seq, seq_id, n) -> int:
        n = _check_int(n, "n")
        if not 0 <= n <= seq.num_tokens:
            raise ValueError(f"n must be in [0, num_tokens={seq.num_tokens}] for sequence {seq_id!r}, got {n}")
        return n

    # ------------------------------------------------------------------ kernel inputs
    def _extend_slots(self, out: list, seq: _Seq, seq_id, start, end, name: str) -> None:
        start = _check_int(start, f"{name}start")
        end = _check_int(end, f"{name}end")
        if start < 0:
            raise ValueError(f"{name}start must be >= 0, got {start}")
        if end < start:
            raise ValueError(f"{name}end ({end}) must be >= {name}start ({start})")
        if end > seq.num_tokens:
            raise ValueError(f"{name}end ({end}) must be <= num_tokens ({seq.num_tokens}) of sequence {seq_id!r}")
        P = self.page_size
        table = seq.table
        pos = start
        while pos < end:
            i = pos // P
            stop = min(end, (i + 1) * P)
            base = table[i] * P + (pos - i * P)
            out.extend(range(base, base + stop - pos))
            pos = stop

    def slot_mapping(self, seq_id, start: int, end: int) -> list[int]:
        """Slots ``page * page_size + offset`` of positions ``[start, end)``, ``end <= num_tokens``.

        Returns a list of ``end - start`` ints (index into a pool viewed as
        ``[num_pages * page_size, num_kv_heads, head_dim]``).
        """
        seq = self._get(seq_id)
        out: list[int] = []
        self._extend_slots(out, seq, seq_id, start, end, "")
        return out

    def batch_slot_mapping(self, seq_ids: Sequence, starts: Sequence[int], ends: Sequence[int],
                           device="cpu") -> torch.Tensor:
        """Slot mappings of ``[starts[i], ends[i])`` of every ``seq_ids[i]``, concatenated in order.

        Returns:
            int64 ``[sum(ends - starts)]`` on ``device``.
        """
        if len(starts) != len(seq_ids):
            raise ValueError(f"starts has {len(starts)} entries, seq_ids has {len(seq_ids)}")
        if len(ends) != len(seq_ids):
            raise ValueError(f"ends has {len(ends)} entries, seq_ids has {len(seq_ids)}")
        out = array("q")
        seqs = self._seqs
        P = self.page_size
        for i, sid in enumerate(seq_ids):
            try:
                s = seqs.get(sid)
            except TypeError:           # unhashable id
                s = None
            a, b = starts[i], ends[i]
            if s is None or type(a) is not int or type(b) is not int or not 0 <= a <= b <= s.num_tokens:
                # Slow path: validates (raising ValueError) and handles non-int index types.
                self._extend_slots(out, self._get(sid, f"seq_ids[{i}]"), sid, a, b, "")
                continue
            if a == b:
                continue
            p = a // P
            if p == (b - 1) // P:       # common case: the range lies in one page
                base = s.table[p] * P + a - p * P
                out.extend(range(base, base + b - a))
            else:
                self._extend_slots(out, s, sid, a, b, "")
        return _to_tensor(out, np.int64, device)

    def block_table(self, seq_ids: Sequence, device="cpu", max_pages: int | None = None) -> torch.Tensor:
        """Page tables of ``seq_ids`` as rows, padded with page 0 (never read past the lengths).

        Args:
            seq_ids: live sequences, one row each, in order.
            device: device of the result.
            max_pages: columns; default the longest table (at least 1). ValueError if a table is longer.

        Returns:
            int32 ``[len(seq_ids), max_pages]`` on ``device``.
        """
        seqs = [self._get(sid, f"seq_ids[{i}]") for i, sid in enumerate(seq_ids)]
        longest = max((len(s.table) for s in seqs), default=0)
        if max_pages is None:
            width = max(longest, 1)
        else:
            width = _check_int(max_pages, "max_pages")
            if width < 0:
                raise ValueError(f"max_pages must be >= 0, got {width}")
            if longest > width:
                raise ValueError(f"max_pages ({width}) is smaller than the longest page table ({longest})")
        flat = array("i")
        pad = array("i", bytes(4 * width))
        for s in seqs:
            t = s.table
            flat += t
            flat += pad[: width - len(t)]
        return _to_tensor(flat, np.int32, device).view(len(seqs), width)

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raise AssertionError unless the bookkeeping is consistent.

        Checks: every reference count equals the number of page tables holding that page; the
        free list holds no duplicates and exactly the pages with reference count 0 (so every page
        is either free or used, none leaked); table lengths match ``ceil(num_tokens / page_size)``;
        ``0 <= primary_len, secondary_len <= num_tokens``.
        """
        P = self.page_size
        counts = [0] * self.num_pages
        for sid, s in self._seqs.items():
            if len(s.table) != (s.num_tokens + P - 1) // P:
                raise AssertionError(f"sequence {sid!r}: {len(s.table)} pages for {s.num_tokens} tokens")
            if len(set(s.table)) != len(s.table):
                raise AssertionError(f"sequence {sid!r}: a page appears twice in its table {s.table}")
            if not (0 <= s.primary_len <= s.num_tokens and 0 <= s.secondary_len <= s.num_tokens):
                raise AssertionError(f"sequence {sid!r}: lengths ({s.primary_len}, {s.secondary_len}) "
                                     f"outside [0, {s.num_tokens}]")
            for p in s.table:
                if not 0 <= p < self.num_pages:
                    raise AssertionError(f"sequence {sid!r}: page {p} out of range")
                counts[p] += 1
        if counts != self._refcount:
            bad = [p for p in range(self.num_pages) if counts[p] != self._refcount[p]]
            raise AssertionError(f"reference counts wrong for pages {bad}: stored "
                                 f"{[self._refcount[p] for p in bad]}, tables hold {[counts[p] for p in bad]}")
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        unused = {p for p in range(self.num_pages) if counts[p] == 0}
        if free != unused:
            raise AssertionError(f"free list {sorted(free)} differs from unused pages {sorted(unused)}")


def _to_tensor(buf: array, dtype, device) -> torch.Tensor:
    """A 1-D tensor over an ``array.array`` (no per-element conversion), moved to ``device``."""
    if len(buf) == 0:
        t = torch.empty(0, dtype=torch.int64 if dtype is np.int64 else torch.int32)
    else:
        t = torch.from_numpy(np.frombuffer(buf, dtype=dtype))
    if torch.device(device).type != "cpu":
        t = t.to(device)
    return t


def copy_indices(copies: Iterable[tuple[int, int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(src_pages, dst_pages)``: int64 ``[n]`` tensors on ``device`` for ``tandem_rt.ops.copy_pages``."""
    copies = list(copies)
    src = torch.tensor([c[0] for c in copies], dtype=torch.int64, device=device)
    dst = torch.tensor([c[1] for c in copies], dtype=torch.int64, device=device)
    return src, dst
