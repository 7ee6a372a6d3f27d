"""``tandem_rt.Engine``: every generation mode of a Tandem checkpoint on one shared paged cache.

Modes:

* ``primary`` — the primary alone, autoregressive (the baseline).
* ``secondary`` — the checkpoint's ``secondary.*`` weights alone as a plain causal LM (its own
  K/V only, no primary representations).
* ``speed`` — speculative decoding with the standalone drafter (``drafter.*``) on its own pool.
* ``tandem`` — the Tandem model as a generator (not lossless): the secondary generates γ tokens
  per block, the primary processes them (refreshing the secondary's K/V); with ``free_token``
  the primary's prediction after the block is emitted too (paper Fig. 2), without it only the
  representations are refreshed (paper Fig. 4).
* ``tandem-speed`` — Tandem + SPEED (lossless): the secondary drafts, the primary verifies.

``gamma`` is the number of drafted tokens per block (an int), or ``"auto"``: the checkpoint's
router stops drafting when the predicted acceptance ``1 - tv`` falls under its threshold, or
at its ``gamma_max``.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from tandem_rt.engine.generation import Generation
from tandem_rt.engine.paged_model import PagedLlama
from tandem_rt.engine.params import SamplingParams
from tandem_rt.engine.refresh import TandemRefresh
from tandem_rt.engine.verification import run_verify
from tandem_rt.engine.results import Result, StreamEvent
from tandem_rt.models.tandem import TandemModel
from tandem_rt.paths import default_model_path

MODES = ("primary", "secondary", "speed", "tandem", "tandem-speed")
DEFAULT_KV_CACHE_MEMORY = 256 << 20  # bytes of K/V pools when neither num_pages nor kv_cache_memory is given
MAX_GAMMA = 31          # a verify block holds gamma + 1 <= 32 queries per sequence (paged_attention)


def _default_model_path() -> Optional[str]:
    """The bundled checkpoint, when the installation has it."""
    path = default_model_path()
    return str(path) if path.exists() else None


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on ``device``: ``MemAvailable`` of ``/proc/meminfo`` on the
    CPU, ``torch.cuda.mem_get_info`` on CUDA; None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def _referenced_gguf_matrices(path, model: TandemModel) -> dict:
    """The quantized matrices of the GGUF file a checkpoint's ``primary_source`` names."""
    from tandem_rt.primary_source import resolve_reference
    from tandem_rt.quantized import read_gguf_matrices

    ref = model.config.primary_source
    if ref is None or ref.get("kind") != "gguf":
        raise ValueError(f"quantized=True needs a checkpoint whose primary_source is a GGUF file; {path} "
                         + ("stores its primary's weights" if ref is None else f"references a {ref.get('kind')} source"))
    return read_gguf_matrices(resolve_reference(ref, Path(path)), model.config.primary)


def check_quantized_primary(quantized: dict, primary, device, dtype) -> None:
    """ValueError unless ``quantized`` maps parameter names of ``primary`` to QuantMatrix of their shapes."""
    from tandem_rt.quantized import QuantMatrix

    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantized_primary needs the CPU engine in bfloat16 or float32, got {device} {dtype}")
    if not isinstance(quantized, dict):
        raise ValueError(f"quantized_primary must be a dict of parameter name -> QuantMatrix, got {type(quantized).__name__}")
    params = dict(primary.named_parameters())
    for name, qm in quantized.items():
        if not isinstance(qm, QuantMatrix):
            raise ValueError(f"quantized_primary[{name!r}] must be a QuantMatrix, got {type(qm).__name__}")
        if name not in params:
            raise ValueError(f"quantized_primary names {name!r}, which is not a parameter of the primary")
        shape = tuple(params[name].shape)
        if (qm.out_features, qm.in_features) != shape:
            raise ValueError(f"quantized_primary[{name!r}] is [{qm.out_features}, {qm.in_features}], "
                             f"the primary's parameter is {list(shape)}")


def release_dense_copies(primary, quantized: dict) -> None:
    """Replace the primary's parameters that the engine serves as blocks by empty tensors (their
    dequantised copies are never read again: ``PagedLlama`` holds the blocks and, for a quantized
    embedding, serves the lookups and the tied LM head from them)."""
    params = dict(primary.named_parameters())
    with torch.no_grad():
        for name in quantized:
            p = params[name]
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class Engine:
    """Serves a :class:`TandemModel` in every mode over paged K/V pools.

    Args:
        model: the Tandem model (its weights are used in place; its q/k/v and gate/up parameters become
            views of the fused weights, see ``paged_model.py``).
        tokenizer: a Hugging Face ``tokenizers.Tokenizer`` (needed for string prompts and ``text``).
        device: device to run on (default: the model's).
        dtype: weight and cache dtype (default: the model's); the model is converted in place if different.
        max_batch_size: sequences decoded together at most (more prompts/samples queue up).
        kv_cache_memory: bytes for the K/V pools of all models (alternative to ``num_pages``).
        num_pages: pages in the pool (default: ``max_batch_size`` full-context sequences, capped by
            :data:`DEFAULT_KV_CACHE_MEMORY` bytes; at least one page per sequence and block).
        page_size: token positions per page.
        prefill_chunk: prompt rows per sequence per prefill forward (1..32) when ``dense_prefill``
            is off (prompts then go through ``paged_attention`` in chunks).
        dense_prefill: process whole prompts in one forward with dense causal attention (torch
            SDPA over the prompt's own rows; their K/V are still written to the pools).
        max_prefill_tokens: prompt rows per dense prefill forward (prompts are grouped up to this
            many rows; a longer prompt runs alone).
        use_cuda_graphs: capture and replay the decode / verify steps on CUDA (see ``cuda_graphs.py``).
        quantized_primary: ``{parameter name: QuantMatrix}`` of the primary's weights kept in their
            GGUF blocks (``tandem_rt.quantized.read_gguf_matrices``; CPU, bf16 / fp32): the
            primary's products read those blocks (``linear_rows_q``) instead of its dense weights.
    """

    def __init__(self, model: TandemModel, tokenizer=None, *, device=None, dtype=None, max_batch_size: int = 8,
                 kv_cache_memory: Optional[int] = None, num_pages: Optional[int] = None, page_size: int = 16,
                 prefill_chunk: int = 32, use_cuda_graphs: bool = False, dense_prefill: bool = True,
                 max_prefill_tokens: int = 8192, quantized_primary: Optional[dict] = None):
        from tandem_rt.paged import KVCache, PageManager, pages_for_memory

        if not isinstance(model, TandemModel):
            raise ValueError(f"model must be a TandemModel, got {type(model).__name__}")
        for name, v, lo in (("max_batch_size", max_batch_size, 1), ("page_size", page_size, 1),
                            ("prefill_chunk", prefill_chunk, 1), ("max_prefill_tokens", max_prefill_tokens, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if prefill_chunk > 32:
            raise ValueError(f"prefill_chunk must be at most 32 (paged_attention's query rows), got {prefill_chunk}")
        if not isinstance(dense_prefill, bool):
            raise ValueError(f"dense_prefill must be True or False, got {dense_prefill!r}")
        if num_pages is not None and kv_cache_memory is not None:
            raise ValueError("give num_pages or kv_cache_memory, not both")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype if dtype is not None else param.dtype
        if isinstance(self.dtype, str):
            from tandem_rt.config import DTYPES
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            self.dtype = DTYPES[self.dtype]
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {self.device}")
        if param.device != self.device or param.dtype != self.dtype:
            if getattr(model, "_tandem_rt_bound_ptr", None) == param.data_ptr():
                raise ValueError(f"model is already served by another Engine in {param.dtype} on {param.device}; "
                                 f"converting it to {self.dtype} on {self.device} in place would break that engine: "
                                 "pass a copy (copy.deepcopy(model)) or the same dtype and device")
            model.to(device=self.device, dtype=self.dtype)
            with torch.no_grad():  # views of another engine's fused weights keep their strides through .to()
                for p in model.parameters():
                    if not p.is_contiguous():
                        p.data = p.data.contiguous()
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.dense_prefill = dense_prefill
        self.max_prefill_tokens = max_prefill_tokens
        self.router_lag = None    # gamma="auto" reads router decisions a step late: None = on CUDA only
        cfg = model.config
        self.vocab_size = cfg.primary.vocab_size
        self.layer_map = list(model.layer_map)
        self.router_top_k = cfg.router.top_k if cfg.router is not None else None
        if quantized_primary is not None:
            check_quantized_primary(quantized_primary, model.primary, self.device, self.dtype)
        self.primary = PagedLlama(model.primary, quantized=quantized_primary)
        self.secondary = PagedLlama(model.secondary)
        self.drafter = PagedLlama(model.drafter) if model.drafter is not None else None
        self.refresh = TandemRefresh(model, self.secondary)
        cfgs = [cfg.primary, cfg.secondary] + ([cfg.drafter] if cfg.drafter is not None else [])
        if kv_cache_memory is not None:
            if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0:
                raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
            num_pages = pages_for_memory(kv_cache_memory, page_size, cfgs, self.dtype)
            if num_pages < 1:
                raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds no page of {page_size} tokens")
        elif num_pages is None:
            ctx = min(c.max_position_embeddings for c in cfgs)
            full = max_batch_size * (-(-(ctx + MAX_GAMMA + 1) // page_size)) + 1
            budget = pages_for_memory(DEFAULT_KV_CACHE_MEMORY, page_size, cfgs, self.dtype)
            floor = max_batch_size * (-(-(MAX_GAMMA + 1) // page_size) + 1) + 1
            num_pages = max(min(full, budget), floor)
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
        need = num_pages * sum(KVCache.bytes_per_page(c.num_hidden_layers, page_size, c.num_key_value_heads,
                                                      c.head_dim, self.dtype) for c in cfgs)
        avail = available_memory(self.device)
        if avail is not None and need > avail:
            raise ValueError(f"the K/V pools need {need / 2**30:.2f} GiB ({num_pages} pages of {page_size} tokens) but "
                             f"{self.device} has {avail / 2**30:.2f} GiB available: lower num_pages / kv_cache_memory "
                             "(or max_batch_size)")
        self.page_manager = PageManager(num_pages, page_size)
        mk = lambda c: KVCache(c.num_hidden_layers, num_pages, page_size, c.num_key_value_heads, c.head_dim,  # noqa: E731
                               self.dtype, self.device)
        self.primary_cache = mk(cfg.primary)
        self.secondary_cache = mk(cfg.secondary)
        self.drafter_cache = mk(cfg.drafter) if cfg.drafter is not None else None
        # the model's parameters are now views of this engine's fused weights (a deep copy is not)
        model._tandem_rt_bound_ptr = next(model.parameters()).data_ptr()
        self._seq_ids = itertools.count()
        self._lock = threading.Lock()
        self.cuda_graphs = None
        if use_cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"use_cuda_graphs needs a CUDA device, the engine runs on {self.device}")
            from tandem_rt.engine.cuda_graphs import CudaGraphRunner
            self.cuda_graphs = CudaGraphRunner(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path=None, device="cpu", dtype=None, max_batch_size: int = 8,
                        kv_cache_memory: Optional[int] = None, num_pages: Optional[int] = None,
                        page_size: int = 16, quantized: bool = False, **kwargs) -> "Engine":
        """Load a checkpoint directory (default: the bundled model) and its ``tokenizer.json``.

        ``quantized``: the primary's products read the Q8_0 / Q4_0 / Q4_1 blocks of the GGUF file
        the checkpoint references (``primary_source`` of kind ``gguf``) instead of the dequantised
        weights (CPU, bf16 / fp32). The dequantised copies of the weights served as blocks are then
        released (``engine.model.primary`` is no longer a runnable reference module)."""
        from tandem_rt.checkpoint import TOKENIZER_NAME, load_checkpoint

        if path is None:
            path = _default_model_path()
            if path is None:
                raise ValueError("path is required: no bundled model is installed")
        if isinstance(dtype, str):
            from tandem_rt.config import DTYPES
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        model = load_checkpoint(path, device=device, dtype=dtype)
        if quantized:
            kwargs["quantized_primary"] = _referenced_gguf_matrices(path, model)
        tokenizer = None
        tok_file = Path(path) / TOKENIZER_NAME
        if tok_file.is_file():
            from tokenizers import Tokenizer

            from tandem_rt.checkpoint import CheckpointError
            try:
                tokenizer = Tokenizer.from_file(str(tok_file))
            except Exception as exc:  # tokenizers raises a bare Exception for malformed files
                raise CheckpointError(f"malformed tokenizer file {tok_file}: {exc}") from None
        engine = cls(model, tokenizer, device=device, dtype=dtype, max_batch_size=max_batch_size,
                     kv_cache_memory=kv_cache_memory, num_pages=num_pages, page_size=page_size, **kwargs)
        if quantized:
            release_dense_copies(model.primary, kwargs["quantized_primary"])
        return engine

    # ------------------------------------------------------------------ internals used by Generation
    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def run(self, model: PagedLlama, cache, ids: torch.Tensor, meta, last_rows_only: bool = False,
            hidden_layers=(), refresh: bool = False, verify=None):
        """One paged forward of a decode / verify step: a captured CUDA graph when one applies
        (uniform rows per sequence), else eager. With ``refresh`` (a primary step of the Tandem
        modes, ``hidden_layers`` = the layer map) the Tandem refresh of the same rows follows; with
        ``verify`` (:class:`~tandem_rt.engine.verification.VerifyInputs`, a uniform verify block of
        ``q`` rows per sequence whose rows 1.. are the drafts) the verification follows — both
        inside the graph when there is one. Returns (logits, hidden) as ``PagedLlama.forward``,
        plus (accepted int32 ``[B]``, emitted int64 ``[B, q]``) with ``verify``."""
        if self.cuda_graphs is not None and meta.uniform_q_len:
            out = self.cuda_graphs.run(model, cache, ids, meta, last_rows_only, tuple(hidden_layers), refresh, verify)
            if out is not None:
                return out
        logits, hidden = model.forward(ids, meta, cache.k, cache.v,
                                       logits_rows=meta.last_rows if last_rows_only else None,
                                       hidden_layers=hidden_layers, step=True)
        if refresh:
            self.refresh(hidden, meta.positions, meta.slot_mapping, self.secondary_cache.k, self.secondary_cache.v,
                         step=True)
        if verify is None:
            return logits, hidden
        B, q = meta.num_seqs, meta.uniform_q_len
        drafts = ids.view(B, q)[:, 1:].contiguous()
        return (logits, hidden) + tuple(run_verify(drafts, logits, verify, B, q))

    def all_cache_tensors(self) -> list:
        out = self.primary_cache.tensors() + self.secondary_cache.tensors()
        if self.drafter_cache is not None:
            out += self.drafter_cache.tensors()
        return out

    # ------------------------------------------------------------------ validation
    def _tokenize(self, prompt, i: int) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{i}] is a string but the engine has no tokenizer; pass token ids")
            if not prompt:
                raise ValueError(f"prompts[{i}] is empty")
            ids = self.tokenizer.encode(prompt).ids
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point:
                raise ValueError(f"prompts[{i}] must be a 1-D integer tensor, got {tuple(prompt.shape)} {prompt.dtype}")
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise ValueError(f"prompts[{i}] must be a string, a list of token ids or a 1-D integer tensor, "
                             f"got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        V = self.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"prompts[{i}] holds token id {t!r} outside the vocabulary [0, {V})")
        return ids

    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, (str, torch.Tensor)):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)):
            if not prompts:
                raise ValueError("prompts is empty")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
                prompts = [list(prompts)]
        else:
            raise ValueError(f"prompts must be a string, a list of token ids or a list of them, got {type(prompts).__name__}")
        return [self._tokenize(p, i) for i, p in enumerate(prompts)]

    def check_request(self, prompts, params, mode, gamma, free_token):
        """Validate a request before any work; returns (token-id prompts, params)."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        cfg = self.model.config
        if mode == "speed" and self.drafter is None:
            raise ValueError("mode 'speed' needs a standalone drafter, but the checkpoint has no drafter.* weights")
        if gamma == "auto":
            if mode not in ("speed", "tandem", "tandem-speed"):
                raise ValueError(f"gamma='auto' applies to the drafting modes, not {mode!r}")
            if self.model.router is None:
                raise ValueError("gamma='auto' needs the checkpoint's router, but it has no router.* weights")
            embed = cfg.drafter.hidden_size if mode == "speed" else cfg.secondary.hidden_size
            if embed != cfg.router.embed_dim:
                raise ValueError(f"gamma='auto' in mode {mode!r}: the router reads {cfg.router.embed_dim}-d embeddings, "
                                 f"the drafting model has {embed}")
            gmax = cfg.router.gamma_max
        else:
            if isinstance(gamma, bool) or not isinstance(gamma, int) or not 1 <= gamma <= MAX_GAMMA:
                raise ValueError(f"gamma must be an integer in [1, {MAX_GAMMA}] or 'auto', got {gamma!r}")
            gmax = gamma
        if gmax > MAX_GAMMA:
            raise ValueError(f"the router's gamma_max ({gmax}) exceeds {MAX_GAMMA}")
        if not isinstance(free_token, bool):
            raise ValueError(f"free_token must be a bool, got {free_token!r}")
        ids = self._normalize_prompts(prompts)
        models = {"primary": [cfg.primary], "secondary": [cfg.secondary], "speed": [cfg.primary, cfg.drafter],
                  "tandem": [cfg.primary, cfg.secondary], "tandem-speed": [cfg.primary, cfg.secondary]}[mode]
        ctx = min(c.max_position_embeddings for c in models)
        ps = self.page_manager.page_size
        for i, p in enumerate(ids):
            if len(p) + params.max_new_tokens > ctx:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} "
                                 f"that exceeds the model's context of {ctx} positions")
            need = -(-len(p) // ps) + -(-(len(p) + params.max_new_tokens + gmax + 1) // ps)
            if need > self.page_manager.num_pages:
                raise ValueError(f"prompts[{i}] needs up to {need} KV-cache pages but the pool has "
                                 f"{self.page_manager.num_pages}; raise num_pages / kv_cache_memory "
                                 f"or lower max_new_tokens")
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids holds {t}, outside the vocabulary [0, {self.vocab_size})")
        return ids, params

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, params: Optional[SamplingParams] = None, mode: str = "tandem-speed",
                 gamma: Union[int, str] = 5, free_token: bool = True) -> list:
        """Generate continuations.

        Args:
            prompts: a string, a list of token ids (a 1-D int tensor), or a list of those.
            params: :class:`SamplingParams` (default: greedy, 128 new tokens).
            mode: one of ``primary``, ``secondary``, ``speed``, ``tandem``, ``tandem-speed``.
            gamma: drafted tokens per block (``1..31``) or ``"auto"`` (the router decides).
            free_token: ``tandem`` mode only: emit the primary's prediction after each block.
        Returns:
            ``list[Result]``, ``len(prompts) * params.n`` long, prompt-major: result
            ``i * n + j`` is sample ``j`` of prompt ``i``.
        Raises:
            ValueError: an invalid request (before any work starts).
        """
        ids, params = self.check_request(prompts, params, mode, gamma, free_token)
        results: list = [None] * (len(ids) * params.n)
        with self._lock:
            gen = Generation(self, ids, params, mode, gamma, free_token)
            gen.text_deltas = False
            for ev in gen.events():
                if ev.finished:
                    results[ev.index] = ev.result
        return results

    def stream(self, prompt, params: Optional[SamplingParams] = None, mode: str = "tandem-speed",
               gamma: Union[int, str] = 5, free_token: bool = True) -> Iterator[StreamEvent]:
        """Like :meth:`generate` for one prompt (``params.n`` samples), yielding a
        :class:`StreamEvent` per sequence and iteration as tokens are committed. Closing the
        iterator early cancels the request and frees its pages. The engine is held for other
        callers until the iterator is exhausted or closed."""
        ids, params = self.check_request(prompt, params, mode, gamma, free_token)
        if len(ids) != 1:
            raise ValueError(f"stream takes one prompt, got {len(ids)}")

        def run():
            with self._lock:
                gen = Generation(self, ids, params, mode, gamma, free_token)
                try:
                    yield from gen.events()
                finally:
                    gen.release()
        return run()

    @property
    def num_free_pages(self) -> int:
        return self.page_manager.num_free_pages
