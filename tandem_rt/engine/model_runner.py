"""The model runner: the models, their paged pools, the CUDA graphs, and the one step function.

The runner knows nothing of requests: a step is given token ids and a :class:`ForwardMeta`
(built from the page manager by the step functions of ``steps.py``) and returns device tensors.
:meth:`ModelRunner.forward_step` — forward, then the Tandem refresh of the same rows, then the
verification of a verify block — is the body that both the eager path and the CUDA-graph capture
(``cuda_graphs.py``) run, so the two cannot drift apart.
"""
from __future__ import annotations

from typing import Optional

import torch

from tandem_rt import ops
from tandem_rt.engine.paged_model import ForwardMeta, PagedLlama, h2d
from tandem_rt.engine.refresh import TandemRefresh
from tandem_rt.engine.verification import VerifyInputs, run_verify
from tandem_rt.models.tandem import TandemModel


class ModelRunner:
    """Holds the paged models and pools of one engine.

    Args:
        model: the Tandem model (weights used in place, see ``PagedLlama``).
        page_manager: the :class:`~tandem_rt.paged.PageManager` whose page table all pools share.
        device, dtype: where and in what the pools live (the model already converted).
        quantized_primary: ``{parameter name: QuantMatrix}`` served as GGUF blocks, or None.
        max_batch_size: the largest batch a step runs (the CUDA graph buckets).
        attention_kernel, attention_waves: the CUDA paged-attention options of every model
            (``PagedLlama``).
        draft_quantization: ``"Q8_0"`` / ``"Q4_1"``: the secondary's and the drafter's layer matrices
            and LM heads served as blocks of that type (``quantized.quantize_drafting_model``), or None.
    """

    def __init__(self, model: TandemModel, page_manager, device: torch.device, dtype: torch.dtype,
                 quantized_primary: Optional[dict] = None, max_batch_size: int = 8,
                 attention_kernel: str = "simt", attention_waves: int = 0,
                 draft_quantization: Optional[str] = None):
        from tandem_rt.paged import KVCache
        from tandem_rt.quantized import quantize_drafting_model

        cfg = model.config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.page_manager = page_manager
        self.max_batch_size = max_batch_size
        self.vocab_size = cfg.primary.vocab_size
        self.layer_map = list(model.layer_map)
        self.draft_quantization = draft_quantization
        attn = {"attention_kernel": attention_kernel, "attention_waves": attention_waves}
        self.primary = PagedLlama(model.primary, quantized=quantized_primary, **attn)

        def drafting(m, **kw):   # a drafting model, its matrices quantized when asked
            if draft_quantization is None:
                return PagedLlama(m, **kw, **attn)
            layers, head = quantize_drafting_model(m, draft_quantization)
            if not layers and head is None:
                raise ValueError(f"draft_quantization={draft_quantization!r}: the drafting model has no matrix with a "
                                 f"multiple of 32 inputs to quantize (hidden size {m.config.hidden_size})")
            return PagedLlama(m, quantized=layers, quantized_head=head, **kw, **attn)

        self.secondary = drafting(model.secondary, feature_at=cfg.feature_at)
        self.drafter = drafting(model.drafter) if model.drafter is not None else None
        self.refresh = TandemRefresh(model, self.secondary)
        pages, ps = page_manager.num_pages, page_manager.page_size
        mk = lambda c: KVCache(c.num_hidden_layers, pages, ps, c.num_key_value_heads, c.head_dim,  # noqa: E731
                               dtype, device)
        self.primary_cache = mk(cfg.primary)
        self.secondary_cache = mk(cfg.secondary)
        self.drafter_cache = mk(cfg.drafter) if cfg.drafter is not None else None
        # the feature input's pool [num_pages + 1, page_size, d_S] (refresh.py; the last page takes slot -1 rows)
        self.feature_pool = None if model.feature is None else torch.zeros(
            pages + 1, ps, cfg.secondary.hidden_size, dtype=dtype, device=device)
        self._pools = {"primary": (self.primary, self.primary_cache),
                       "secondary": (self.secondary, self.secondary_cache),
                       "drafter": (self.drafter, self.drafter_cache)}
        self.cuda_graphs = None

    # ------------------------------------------------------------------ models and pools
    def pool(self, name: str):
        """(PagedLlama, KVCache) of ``"primary"``, ``"secondary"`` or ``"drafter"``."""
        return self._pools[name]

    def all_cache_tensors(self) -> list:
        out = self.primary_cache.tensors() + self.secondary_cache.tensors()
        if self.drafter_cache is not None:
            out += self.drafter_cache.tensors()
        if self.feature_pool is not None:
            out.append(self.feature_pool)
        return out

    @property
    def uniform_blocks(self) -> bool:
        """Verify blocks padded to the same rows per sequence (so that a CUDA graph replays them);
        otherwise each sequence's block has its own draft count + 1 rows."""
        return self.cuda_graphs is not None

    def prepare_writes(self, seq_ids, starts, ends) -> None:
        """Make positions ``[starts[b], ends[b])`` of each sequence writable; the copy-on-write page
        copies run over every pool."""
        copies = []
        for sid, a, b in zip(seq_ids, starts, ends):
            copies += self.page_manager.prepare_write(sid, a, b)
        if copies:
            src = h2d([c[0] for c in copies], torch.int64, self.device)
            dst = h2d([c[1] for c in copies], torch.int64, self.device)
            ops.copy_pages(self.all_cache_tensors(), src, dst)

    # ------------------------------------------------------------------ the step function
    def forward_step(self, model: PagedLlama, cache, ids: torch.Tensor, meta: ForwardMeta,
                     last_rows_only: bool = False, hidden_layers=(), refresh: bool = False,
                     verify: Optional[VerifyInputs] = None, logits_rows: Optional[torch.Tensor] = None,
                     feature_offset: Optional[torch.Tensor] = None, reduced: bool = False):
        """One decode / verify step: the paged forward of ``ids`` (int64 ``[T]``) over ``meta``;
        with ``refresh`` the Tandem refresh of the same rows into the secondary pool
        (``hidden_layers`` = the layer map); with ``verify`` (rows ``1..`` of each sequence are its
        drafts) the verification of the block. Returns (logits, hidden) as
        ``PagedLlama.forward``, plus (accepted int32 ``[B]``, emitted int64 ``[B, G + 1]``) with
        ``verify``. ``logits_rows`` (int64 ``[R]``): the rows whose logits are computed, instead
        of every row (or the last rows with ``last_rows_only``). ``feature_offset`` ``[T, d]``: the
        secondary's feature input (``steps.draft``), added where ``model.feature_at`` says.
        ``reduced``: logits over the model's reduced vocabulary (``PagedLlama.forward``)."""
        if logits_rows is None and last_rows_only:
            logits_rows = meta.last_rows
        logits, hidden = model.forward(ids, meta, cache.k, cache.v, logits_rows=logits_rows,
                                       hidden_layers=hidden_layers, step=True, feature_offset=feature_offset,
                                       reduced=reduced)
        if refresh:
            self.refresh(hidden, meta.positions, meta.slot_mapping, self.secondary_cache.k, self.secondary_cache.v,
                         step=True, features=self.feature_pool, input_ids=ids)
        if verify is None:
            return logits, hidden
        return (logits, hidden) + tuple(run_verify(ids, logits, meta, verify))

    def run(self, model: PagedLlama, cache, ids: torch.Tensor, meta: ForwardMeta, last_rows_only: bool = False,
            hidden_layers=(), refresh: bool = False, verify: Optional[VerifyInputs] = None,
            logits_rows: Optional[torch.Tensor] = None, feature_offset: Optional[torch.Tensor] = None,
            reduced: bool = False):
        """:meth:`forward_step`, replayed from a captured CUDA graph when one applies (uniform rows
        per sequence, no prompt rows, full-vocabulary logits), else eager. Same results either way."""
        if self.cuda_graphs is not None and meta.uniform_q_len and logits_rows is None and not reduced:
            out = self.cuda_graphs.run(model, cache, ids, meta, last_rows_only, tuple(hidden_layers), refresh, verify,
                                       feature_offset)
            if out is not None:
                return out
        return self.forward_step(model, cache, ids, meta, last_rows_only, hidden_layers, refresh, verify, logits_rows,
                                 feature_offset, reduced)

    def prompt_forward(self, model: PagedLlama, cache, ids: torch.Tensor, meta: ForwardMeta, refresh: bool):
        """A prefill forward (prompt products, ``step=False``) -> last-row logits ``[B, V]``; writes
        the pools and, with ``refresh``, the Tandem refresh of the prompt's rows."""
        logits, hidden = model.forward(ids, meta, cache.k, cache.v, logits_rows=meta.last_rows,
                                       hidden_layers=self.layer_map if refresh else ())
        if refresh:
            self.refresh(hidden, meta.positions, meta.slot_mapping, self.secondary_cache.k, self.secondary_cache.v,
                         features=self.feature_pool, input_ids=ids)
        return logits
