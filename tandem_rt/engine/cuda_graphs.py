"""CUDA graphs for the decode and verify steps (CUDA only; ``Engine(use_cuda_graphs=True)``).

A step whose sequences all have the same number of query rows ``q`` (a drafting-model decode
step: ``q = 1``; a primary verify block with every sequence at γ drafts: ``q = γ + 1``) replays a
graph captured for ``(model, batch bucket, q, outputs)``. The batch is padded to the bucket:
padded sequences get one page-table row of page 0, ``seq_len = q`` and slot -1 (nothing is
written, their outputs are discarded). The graph's ``max_seq_len`` is the model's context, so
the attention launch covers every length; lengths, positions, slots and page tables are device
inputs copied into the graph's static buffers before each replay. A primary block of the Tandem
modes captures the Tandem refresh that follows the forward (it reads the same static positions
and slots; padded rows have slot -1 and write nothing), and a verify block of the speculative
modes captures its verification (``torch.ops.tandem_rt.verify`` on the block's own rows and
logits; static buffers for the draft lengths, drafter probabilities, sampling parameters and the
random state, which is copied in before and back after the replay, so every replay draws fresh
numbers; padded sequences verify zero drafts greedily). A draft step of a secondary with the feature
input has a static input offset (zero for padded rows). The captured body is
``ModelRunner.forward_step``, the function the eager path runs. The drafter's sampling after a decode step
runs eagerly. Ragged steps (prompt chunks) run eagerly; the drafter's catch-up step is made
uniform by the caller. Results are identical with and without graphs (the same kernels run).

Capturing is a pluggable step (``CudaCapture``). ``EagerCapture`` stands in for it on the CPU in the
tests: its "replay" re-runs the step and copies the results into the first run's output buffers,
so the static-buffer plumbing (copy-in, padding to the bucket, slicing the outputs) is checked
without a GPU; the capture itself (stream, pool, no host syncs inside) only on one.
"""
from __future__ import annotations

import torch

from tandem_rt.engine.paged_model import ForwardMeta
from tandem_rt.engine.verification import VerifyInputs


def _buckets(max_batch: int) -> list:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class CudaCapture:
    """Captures a step into a CUDA graph (after two warm-up runs on a side stream) in one memory pool.
    ``capture(run) -> (outputs of run, replay)``; replaying rewrites the same output tensors."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, run):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):                       # warm-up outside the graph (allocator, kernels)
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = run()
        return outputs, graph.replay


class EagerCapture:
    """Test stand-in for :class:`CudaCapture` on any device: replay re-runs the step and copies its
    results (logits, hidden streams) into the first run's tensors, as a graph replay rewrites them."""

    def __call__(self, run):
        outputs = run()

        def replay():
            _copy_into(outputs, run())
        return outputs, replay


def _copy_into(dst, src) -> None:
    """Copy a tuple / list nest of tensors into the same nest of tensors."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    else:
        for d, s_ in zip(dst, src):
            _copy_into(d, s_)


class _Graph:
    """One captured forward (and, with ``refresh``, the Tandem refresh after it; with ``verify``,
    the verification of the block, ``"greedy"`` or ``"probs"`` for a drafter with probabilities)
    with its static inputs and outputs."""

    def __init__(self, runner, model, cache, B: int, q: int, last_rows_only: bool, hidden_layers: tuple, capture,
                 refresh: bool = False, verify=None, offset: bool = False):
        dev = runner.device
        ctx = model.config.max_position_embeddings
        max_pages = -(-(ctx + q) // runner.page_manager.page_size)
        T = B * q
        self.B, self.q, self.T = B, q, T
        self.ids = torch.zeros(T, dtype=torch.int64, device=dev)
        self.meta = ForwardMeta(
            positions=torch.arange(T, device=dev) % q,
            slot_mapping=torch.full((T,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(B, max_pages, dtype=torch.int32, device=dev),
            seq_lens=torch.full((B,), q, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(0, T + 1, q, dtype=torch.int32, device=dev),
            max_q_len=q, max_seq_len=ctx + q,
            last_rows=torch.arange(q - 1, T, q, dtype=torch.int64, device=dev), uniform_q_len=q)
        self.max_pages = max_pages
        # the secondary's feature input: a static [T, d] offset (padded rows: zero)
        self.offset = torch.zeros(T, model.config.hidden_size, dtype=runner.dtype, device=dev) if offset else None
        m = self.meta
        self.verify = None
        if verify is not None:   # static verification inputs; padded sequences: no drafts, greedy
            V, G = model.config.vocab_size, q - 1
            self.verify = VerifyInputs(
                torch.zeros(B, dtype=torch.int32, device=dev),
                torch.zeros(B, G, V, dtype=torch.float32, device=dev) if verify == "probs" else None,
                torch.zeros(B, dtype=torch.float32, device=dev), torch.zeros(B, dtype=torch.int32, device=dev),
                torch.ones(B, dtype=torch.float32, device=dev), torch.zeros(B, 2, dtype=torch.int64, device=dev))

        def run():   # the eager step body itself, on the static buffers
            return runner.forward_step(model, cache, self.ids, m, last_rows_only, hidden_layers, refresh, self.verify,
                                       feature_offset=self.offset)
        outputs, self._replay = capture(run)
        self.logits, self.hidden = outputs[0], outputs[1]
        self.verified = outputs[2:]

    def replay(self, ids: torch.Tensor, meta: ForwardMeta, last_rows_only: bool, verify=None, feature_offset=None):
        """Copy the step's inputs into the static buffers, replay, return views of the outputs:
        (logits, hidden) or, with ``verify`` (:class:`VerifyInputs` of the ``b`` real sequences),
        (logits, hidden, accepted ``[b]``, emitted ``[b, q]``); ``verify.rng`` is advanced."""
        b, T = meta.num_seqs, meta.num_rows
        m = self.meta
        self.ids[:T].copy_(ids)
        self.ids[T:].zero_()
        if self.offset is not None:
            self.offset[:T].copy_(feature_offset)
            self.offset[T:].zero_()
        m.positions[:T].copy_(meta.positions)
        m.slot_mapping[:T].copy_(meta.slot_mapping)
        m.slot_mapping[T:].fill_(-1)
        w = meta.block_tables.shape[1]
        m.block_tables[:b, :w].copy_(meta.block_tables)
        m.block_tables[b:].zero_()
        m.seq_lens[:b].copy_(meta.seq_lens)
        m.seq_lens[b:].fill_(self.q)
        sv = self.verify
        if sv is not None:
            for name in ("lens", "temperature", "top_k", "top_p"):
                getattr(sv, name)[:b].copy_(getattr(verify, name))
            sv.lens[b:].zero_()
            sv.temperature[b:].zero_()
            if sv.probs is not None:
                sv.probs[:b].copy_(verify.probs)
            sv.rng[:b].copy_(verify.rng)
            sv.rng[b:].zero_()
        self._replay()
        logits = self.logits[:b] if last_rows_only else self.logits[:T]
        out = (logits, [h[:T] for h in self.hidden])
        if sv is not None:
            verify.rng.copy_(sv.rng[:b])
            out += (self.verified[0][:b], self.verified[1][:b])
        return out


class CudaGraphRunner:
    """Captures lazily, per (model, bucket, rows per sequence, outputs), and replays.

    Args:
        runner: the :class:`~tandem_rt.engine.model_runner.ModelRunner` whose ``forward_step`` is captured.
        capture: :class:`CudaCapture` (default) or :class:`EagerCapture`.
    """

    def __init__(self, runner, capture=None):
        self.runner = runner
        self.buckets = _buckets(runner.max_batch_size)
        self.graphs: dict = {}
        self.capture = capture if capture is not None else CudaCapture()

    def run(self, model, cache, ids, meta: ForwardMeta, last_rows_only: bool, hidden_layers: tuple,
            refresh: bool = False, verify=None, feature_offset=None):
        """Replays (capturing first if needed) the step's graph; None when no graph applies (the
        caller then runs the step eagerly, including the refresh and the verification)."""
        q = meta.uniform_q_len
        B = meta.num_seqs
        bucket = next((b for b in self.buckets if b >= B), None)
        if bucket is None or q > 32:
            return None
        kind = None if verify is None else ("greedy" if verify.probs is None else "probs")
        offset = feature_offset is not None
        key = (id(model), bucket, q, last_rows_only, hidden_layers, kind, refresh, offset)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = _Graph(self.runner, model, cache, bucket, q, last_rows_only, hidden_layers,
                                          self.capture, refresh, kind, offset)
        if meta.block_tables.shape[1] > g.max_pages:
            return None
        return g.replay(ids, meta, last_rows_only, verify, feature_offset)
