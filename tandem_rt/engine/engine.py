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

Serving (docs/ENGINE.md): :meth:`Engine.submit` queues a request from any thread and returns a
:class:`~tandem_rt.engine.requests.RequestHandle`; one loop serves every live request in one
continuous batch (the scheduler admits, prefills and forks requests between iterations; each
iteration runs one step per kind of step, ``steps.py``, on the model runner). Requests of every
mode and γ share the batch. :meth:`Engine.generate` and :meth:`Engine.stream` are thin wrappers
over ``submit``. One thread at a time runs the loop: a thread in ``generate`` or
:meth:`Engine.run_loop`, else a background thread that exists only while there is work.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from tandem_rt.engine import steps
from tandem_rt.engine.draft_policy import POLICIES, StepCostModel
from tandem_rt.engine.model_runner import ModelRunner
from tandem_rt.engine.modes import MODE_TABLE, MODES
from tandem_rt.engine.params import DEFAULT_GAMMA, SamplingParams
from tandem_rt.engine.requests import EngineOverloaded, RequestHandle
from tandem_rt.engine.results import StreamEvent
from tandem_rt.engine.scheduler import Request, Scheduler, admission_pages
from tandem_rt.models.tandem import TandemModel
from tandem_rt.ops.attention import attention_kernel_code, check_waves
from tandem_rt.paths import default_model_path
DEFAULT_KV_CACHE_MEMORY = 256 << 20  # bytes of K/V pools when neither num_pages nor kv_cache_memory is given
MAX_GAMMA = 31          # a verify block holds gamma + 1 <= 32 queries per sequence (paged_attention)
PROMPT_CHUNK = 32       # prompt rows per sequence per speculative step (paged_attention's query rows)


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


def _referenced_gguf_matrices(path, cfg) -> dict:
    """The quantized matrices of the primary of a checkpoint with config ``cfg``: the blocks it
    stores (``quantized`` in its config), else those of the GGUF file its ``primary_source`` names."""
    from tandem_rt.primary_source import resolve_reference
    from tandem_rt.quantized import read_gguf_matrices

    if cfg.quantized:
        from tandem_rt.checkpoint import quantized_matrices
        return quantized_matrices(path)
    ref = cfg.primary_source
    if ref is None or ref.get("kind") != "gguf":
        raise ValueError(f"quantized=True needs a checkpoint that stores quantized primary matrices "
                         f"(import with --quantize) or whose primary_source is a GGUF file; {path} "
                         + ("stores its primary's weights in floating point" if ref is None
                            else f"references a {ref.get('kind')} source"))
    return read_gguf_matrices(resolve_reference(ref, Path(path)), cfg.primary)


def auto_quantized_primary(path, cfg, device, dtype) -> Optional[dict]:
    """What ``Engine.from_pretrained(quantized="auto")`` serves the primary's matrices from: the
    blocks of :func:`_referenced_gguf_matrices` when the engine runs on the CPU in bf16 / fp32
    (``dtype`` None: the checkpoint's), the checkpoint has blocks (stored, or a referenced GGUF
    file), every matrix is of a type ``linear_rows_q16`` reads (Q8_0 / Q4_1) and this CPU runs its
    int8 kernels (``quantized.packs16()``: AVX-512 VNNI or AVX2); else None (the dense weights).
    There the blocks decode and prefill faster than the dense weights (the default model, bf16, 1
    thread, AMD EPYC with AVX2: ``primary`` 123.6 against 41.4 tokens/s, an 821-token prompt in 2.2
    against 10.5 s; docs/ENGINE.md); on CUDA the block kernel is not measured against the dense
    products, and the portable loops that run elsewhere are ~80x slower than the int8 kernels."""
    from tandem_rt.config import DTYPES
    from tandem_rt.quantized import PACK16_TYPES, packs16

    dtype = dtype if dtype is not None else DTYPES.get(cfg.torch_dtype)
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not packs16():
        return None
    ref = cfg.primary_source
    if not cfg.quantized and (ref is None or ref.get("kind") != "gguf"):
        return None
    blocks = _referenced_gguf_matrices(path, cfg)
    return blocks if blocks and all(qm.qtype in PACK16_TYPES for qm in blocks.values()) else None


def auto_draft_quantization(model: TandemModel, device, dtype) -> Optional[str]:
    """What ``Engine.from_pretrained(draft_quantization="auto")`` serves the drafting models in:
    ``"Q8_0"`` on the CPU in bf16 / fp32 (``dtype`` None: the model's) when the secondary and the
    drafter are a multiple of 32 wide (their products then read half the bytes: as many drafts
    accepted as with dense weights, draft steps about a third cheaper, docs/RESULTS.md "Quantized
    drafting models"), else None (on CUDA the block kernel is not yet measured against the dense
    products)."""
    dtype = dtype if dtype is not None else next(model.parameters()).dtype
    parts = [model.config.secondary] + ([model.config.drafter] if model.config.drafter is not None else [])
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    return "Q8_0" if all(c.hidden_size % 32 == 0 for c in parts) else None


def check_quantized_primary(quantized: dict, primary, device, dtype) -> None:
    """ValueError unless ``quantized`` maps parameter names of ``primary`` to QuantMatrix of their shapes."""
    from tandem_rt.quantized import QuantMatrix

    if device.type not in ("cpu", "cuda") or dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantized_primary needs bfloat16 or float32 on the CPU or CUDA, got {device} {dtype}")
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


def default_dense_prefill(device: torch.device, dtype: torch.dtype, quantized: bool) -> bool:
    """``Engine(dense_prefill=None)``: whole prompts in one dense forward, except on the CPU in
    bfloat16 or with a quantized primary, where chunks through the step kernels are faster (torch's
    bf16 SDPA and GEMM on a CPU without AVX-512 BF16, and the dequantised prompt products; Intel Xeon,
    the default model, ``tandem`` mode, 1,536-token prompt: 21.3 s dense against 5.6 s in chunks
    quantized, 12.0 against 6.4 s for a 1,024-token prompt in bf16, 6.0 against 6.6 s in fp32;
    docs/ENGINE.md)."""
    return not (device.type == "cpu" and (dtype == torch.bfloat16 or quantized))


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
            SDPA over the prompt's own rows; their K/V are still written to the pools); None:
            :func:`default_dense_prefill` (chunks on the CPU in bf16 or with a quantized primary).
        use_cuda_graphs: capture and replay the decode / verify steps on CUDA (see ``cuda_graphs.py``).
        quantized_primary: ``{parameter name: QuantMatrix}`` of the primary's weights kept in their
            GGUF blocks (``tandem_rt.quantized.read_gguf_matrices``; bf16 / fp32, CPU or CUDA, moved
            to the engine's device): the primary's products read those blocks (``linear_rows_q``)
            instead of its dense weights.
        max_queued_requests: :meth:`submit` raises :class:`EngineOverloaded` while this many
            requests wait for admission (None: unbounded). ``generate`` / ``stream`` are not limited.
        step_prompt_rows: prompt rows a speculative step carries at most (chunked prefill of the
            ``primary`` / ``speed`` / ``tandem-speed`` prompts inside the step's primary forward, in
            chunks of 32 rows; the oldest chunk always goes). Bounds the pause a joining request
            adds to the running ones. Prompts of the other modes, and the standalone drafter's pool,
            are prefilled by their own forwards (``dense_prefill`` / ``prefill_chunk``).
        draft_policy: when ``gamma="auto"`` sequences stop drafting: ``"router"`` (the router's
            threshold) or ``"cost"`` (also when a further verify row costs the batch more than its
            expected accepted tokens bring, from the engine's measured step times; greedy outputs
            stay exact, seeded sampled auto requests are then not reproducible across batches;
            see ``draft_policy.py``).
        attention_kernel: the CUDA paged-attention kernel of every model: ``"simt"`` (CUDA cores,
            default) or ``"mma"`` (tensor cores for fp16 / bf16, sm_80+); not used on the CPU.
        attention_waves: CTA waves per SM the CUDA KV split aims for (0: the default, 8).
        draft_quantization: ``"Q8_0"`` or ``"Q4_1"``: the drafting models (the Tandem secondary and
            the standalone drafter) read their layer matrices and LM heads as GGUF blocks of that
            type, quantized when the engine is built (``quantized.quantize_drafting_model``; bf16 /
            fp32, CPU or CUDA): a draft step reads 2-3.5x fewer bytes. The drafts change slightly,
            the lossless modes' outputs do not (the primary verifies). None: dense.
    """

    def __init__(self, model: TandemModel, tokenizer=None, *, device=None, dtype=None, max_batch_size: int = 8,
                 kv_cache_memory: Optional[int] = None, num_pages: Optional[int] = None, page_size: int = 16,
                 prefill_chunk: int = 32, use_cuda_graphs: bool = False, dense_prefill: Optional[bool] = None,
                 quantized_primary: Optional[dict] = None,
                 max_queued_requests: Optional[int] = None, step_prompt_rows: int = 32,
                 draft_policy: str = "router", attention_kernel: str = "simt", attention_waves: int = 0,
                 draft_quantization: Optional[str] = None):
        from tandem_rt.paged import KVCache, PageManager, pages_for_memory

        if not isinstance(model, TandemModel):
            raise ValueError(f"model must be a TandemModel, got {type(model).__name__}")
        for name, v, lo in (("max_batch_size", max_batch_size, 1), ("page_size", page_size, 1),
                            ("step_prompt_rows", step_prompt_rows, 1),
                            ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if prefill_chunk > 32:
            raise ValueError(f"prefill_chunk must be at most 32 (paged_attention's query rows), got {prefill_chunk}")
        if dense_prefill is not None and not isinstance(dense_prefill, bool):
            raise ValueError(f"dense_prefill must be None, True or False, got {dense_prefill!r}")
        if num_pages is not None and kv_cache_memory is not None:
            raise ValueError("give num_pages or kv_cache_memory, not both")
        if draft_policy not in POLICIES:
            raise ValueError(f"draft_policy must be one of {', '.join(POLICIES)}, got {draft_policy!r}")
        attention_kernel_code(attention_kernel)   # ValueError naming the option, before any work
        check_waves(attention_waves)
        if max_queued_requests is not None and (isinstance(max_queued_requests, bool) or not isinstance(
                max_queued_requests, int) or max_queued_requests < 1):
            raise ValueError(f"max_queued_requests must be None or a positive integer, got {max_queued_requests!r}")
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
        self.dense_prefill = (default_dense_prefill(self.device, self.dtype, quantized_primary is not None)
                              if dense_prefill is None else dense_prefill)
        self.router_lag = None    # gamma="auto" reads router decisions a step late: None = on CUDA only
        cfg = model.config
        self.vocab_size = cfg.primary.vocab_size
        self.layer_map = list(model.layer_map)
        self.router_top_k = cfg.router.top_k if cfg.router is not None else None
        if quantized_primary is not None:
            check_quantized_primary(quantized_primary, model.primary, self.device, self.dtype)
        if draft_quantization is not None:
            from tandem_rt.quantized import DRAFT_QUANT_TYPES
            if draft_quantization not in DRAFT_QUANT_TYPES:
                raise ValueError(f"draft_quantization must be None or one of {list(DRAFT_QUANT_TYPES)}, "
                                 f"got {draft_quantization!r}")
            if self.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"draft_quantization needs bfloat16 or float32, got {self.dtype}")
        cfgs = [cfg.primary, cfg.secondary] + ([cfg.drafter] if cfg.drafter is not None else [])
        # the feature pool (feature input only): one [d_S] entry per position
        extra = 0 if cfg.feature_layer is None else (
            page_size * cfg.secondary.hidden_size * self.dtype.itemsize)
        if kv_cache_memory is not None:
            if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0:
                raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
            num_pages = pages_for_memory(kv_cache_memory, page_size, cfgs, self.dtype, extra)
            if num_pages < 1:
                raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds no page of {page_size} tokens")
        elif num_pages is None:
            ctx = min(c.max_position_embeddings for c in cfgs)
            full = max_batch_size * (-(-(ctx + MAX_GAMMA + 1) // page_size)) + 1
            budget = pages_for_memory(DEFAULT_KV_CACHE_MEMORY, page_size, cfgs, self.dtype, extra)
            floor = max_batch_size * (-(-(MAX_GAMMA + 1) // page_size) + 1) + 1
            num_pages = max(min(full, budget), floor)
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
        need = num_pages * (extra + sum(KVCache.bytes_per_page(c.num_hidden_layers, page_size, c.num_key_value_heads,
                                                               c.head_dim, self.dtype) for c in cfgs))
        avail = available_memory(self.device)
        if avail is not None and need > avail:
            raise ValueError(f"the K/V pools need {need / 2**30:.2f} GiB ({num_pages} pages of {page_size} tokens) but "
                             f"{self.device} has {avail / 2**30:.2f} GiB available: lower num_pages / kv_cache_memory "
                             "(or max_batch_size)")
        if use_cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graphs needs a CUDA device, the engine runs on {self.device}")
        self.page_manager = PageManager(num_pages, page_size)
        self.runner = ModelRunner(model, self.page_manager, self.device, self.dtype, quantized_primary, max_batch_size,
                                  attention_kernel, attention_waves, draft_quantization)
        r = self.runner     # the models and pools, also reachable from the engine
        self.primary, self.secondary, self.drafter, self.refresh = r.primary, r.secondary, r.drafter, r.refresh
        self.primary_cache, self.secondary_cache, self.drafter_cache = r.primary_cache, r.secondary_cache, r.drafter_cache
        # the model's parameters are now views of this engine's fused weights (a deep copy is not)
        model._tandem_rt_bound_ptr = next(model.parameters()).data_ptr()
        if use_cuda_graphs:
            from tandem_rt.engine.cuda_graphs import CudaGraphRunner
            r.cuda_graphs = CudaGraphRunner(r)
        self.max_queued_requests = max_queued_requests
        self.step_prompt_rows = step_prompt_rows
        self.draft_policy = draft_policy
        self.step_costs = StepCostModel()
        self.scheduler = Scheduler(self.page_manager, max_batch_size, tokenizer)
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._driver: Optional[threading.Thread] = None   # the thread running iterations now
        self._background = False     # whether the driver is the engine's own loop thread
        self._yield = False          # run_loop() asks the background thread to hand the loop over
        self._num_threads = torch.get_num_threads()
        self._ids = itertools.count()
        self._handles: dict = {}      # request_id -> RequestHandle of live requests
        self._closed = False
        self._counters = collections.Counter()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path=None, device="cpu", dtype=None, max_batch_size: int = 8,
                        kv_cache_memory: Optional[int] = None, num_pages: Optional[int] = None,
                        page_size: int = 16, quantized="auto", draft_quantization: Optional[str] = "auto",
                        **kwargs) -> "Engine":
        """Load a checkpoint directory (default: the bundled model) and its ``tokenizer.json``.

        ``draft_quantization``: as :class:`Engine`'s, or ``"auto"`` (the default here):
        :func:`auto_draft_quantization` of the loaded model, device and dtype (Q8_0 drafting models
        on the CPU).

        ``quantized``: True: the primary's products read Q8_0 / Q4_0 / Q4_1 blocks instead of the
        dequantised weights (bf16 / fp32, CPU or CUDA): those the checkpoint stores (``quantized`` in its
        config, ``save_checkpoint(quantize=...)`` / ``--quantize`` at import), else those of the
        GGUF file it references (``primary_source`` of kind ``gguf``). Those matrices are not
        loaded dense (``load_checkpoint(skip_values=...)``) and their placeholders are released
        once the engine is built (``engine.model.primary`` is no longer a runnable reference
        module). False: the dense weights. ``"auto"`` (the default): :func:`auto_quantized_primary`
        (the blocks on a CPU with ``linear_rows_q16``'s int8 kernels, where they decode and prefill
        faster than the dense weights)."""
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
        if quantized not in (True, False, "auto"):
            raise ValueError(f"quantized must be True, False or 'auto', got {quantized!r}")
        skip = blocks = None
        if quantized:
            from tandem_rt.checkpoint import read_config
            cfg = read_config(path)
            blocks = (auto_quantized_primary(path, cfg, device, dtype) if quantized == "auto"
                      else _referenced_gguf_matrices(path, cfg))
        if blocks is not None:
            kwargs["quantized_primary"] = blocks
            # the matrices served as blocks are never read dense: not loaded (their storage stays
            # untouched until release_dense_copies), except an embedding other parts copy
            skip = {"primary." + n for n in kwargs["quantized_primary"]}
            if cfg.shared_embeddings:
                skip.discard("primary.model.embed_tokens.weight")
        model = load_checkpoint(path, device=device, dtype=dtype, skip_values=skip)
        if draft_quantization == "auto":
            draft_quantization = auto_draft_quantization(model, device, dtype)
        kwargs["draft_quantization"] = draft_quantization
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
        if blocks is not None:
            release_dense_copies(model.primary, kwargs["quantized_primary"])
        return engine

    # ------------------------------------------------------------------ the models (see ModelRunner)
    @property
    def cuda_graphs(self):
        """The :class:`~tandem_rt.engine.cuda_graphs.CudaGraphRunner`, or None."""
        return self.runner.cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value) -> None:
        self.runner.cuda_graphs = value

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
            need = admission_pages(len(p), params.max_new_tokens, self._block_slack(mode, gmax), ps)
            if need > self.page_manager.num_pages:
                raise ValueError(f"prompts[{i}] needs up to {need} KV-cache pages but the pool has "
                                 f"{self.page_manager.num_pages}; raise num_pages / kv_cache_memory "
                                 f"or lower max_new_tokens")
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"stop_token_ids holds {t}, outside the vocabulary [0, {self.vocab_size})")
        return ids, params

    def _block_slack(self, mode: str, gmax: int) -> int:
        """Positions past ``prompt + max_new_tokens`` a sequence's block may occupy: its own γ + 1
        (ragged blocks), any batch's γ + 1 (uniform blocks, padded to the batch's longest), 1 when
        the mode does not draft."""
        if self.runner.uniform_blocks:
            return MAX_GAMMA + 1
        return gmax + 1 if MODE_TABLE[mode].drafts else 1

    # ------------------------------------------------------------------ public API
    def submit(self, prompt, params: Optional[SamplingParams] = None, mode: str = "tandem-speed",
               gamma: Union[int, str] = DEFAULT_GAMMA, free_token: bool = True, request_id: Optional[str] = None) -> RequestHandle:
        """Queue one request (callable from any thread) -> its :class:`RequestHandle`.

        Args:
            prompt: a string, a list of token ids or a 1-D integer tensor.
            params, mode, gamma, free_token: as :meth:`generate` (``params.n`` samples).
            request_id: the handle's id (default ``"req-<k>"``); unique among live requests.
        Raises:
            ValueError: an invalid request (nothing is queued).
            EngineOverloaded: ``max_queued_requests`` requests already wait for admission.
        """
        ids, params = self.check_request(prompt, params, mode, gamma, free_token)
        if len(ids) != 1:
            raise ValueError(f"submit takes one prompt, got {len(ids)}; call submit once per prompt")
        return self._submit(ids[0], params, mode, gamma, free_token, request_id, wants_text=True, bounded=True)

    def generate(self, prompts, params: Optional[SamplingParams] = None, mode: str = "tandem-speed",
                 gamma: Union[int, str] = DEFAULT_GAMMA, free_token: bool = True) -> list:
        """Generate continuations (every prompt a request of the continuous batch; blocks until all end).

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
            the engine's exception if a step failed (the call's other requests are cancelled first).
        """
        ids, params = self.check_request(prompts, params, mode, gamma, free_token)
        if self._driver is threading.current_thread():
            raise RuntimeError("generate() called from the thread that runs this engine's loop "
                               "(e.g. inside an event callback) would wait for itself")
        handles = [self._submit(p, params, mode, gamma, free_token, None, wants_text=False, bounded=False,
                                start=False) for p in ids]
        try:
            # the calling thread runs the loop itself unless another thread does (which, when it
            # stops, hands the queued requests over to the background thread)
            self._drive_until(lambda: all(h.done for h in handles))
            out = []
            for i, h in enumerate(handles):
                out += [dataclasses.replace(r, prompt_index=i) for r in h.results()]
            return out
        except BaseException:
            for h in handles:
                h.cancel()
            for h in handles:
                h.wait()
            raise

    def stream(self, prompt, params: Optional[SamplingParams] = None, mode: str = "tandem-speed",
               gamma: Union[int, str] = DEFAULT_GAMMA, free_token: bool = True) -> Iterator[StreamEvent]:
        """Like :meth:`generate` for one prompt (``params.n`` samples), yielding a
        :class:`StreamEvent` per sequence and iteration as tokens are committed. The request is
        queued at once and served in the background; closing the iterator early cancels it and
        returns once its pages are freed. Other callers are never held up by an open stream."""
        ids, params = self.check_request(prompt, params, mode, gamma, free_token)
        if len(ids) != 1:
            raise ValueError(f"stream takes one prompt, got {len(ids)}")
        handle = self._submit(ids[0], params, mode, gamma, free_token, None, wants_text=True, bounded=False)

        def run():
            try:
                yield from handle
            finally:
                if not handle.done:
                    handle.cancel()
                    handle.wait()
        return run()

    def abort(self, request_id) -> bool:
        """Cancel the live request ``request_id``; False when no such request is live."""
        h = self._handles.get(request_id)
        if h is None:
            return False
        h.cancel()
        return True

    def close(self) -> None:
        """Cancel every live request and wait for the loop to end them; later submits raise."""
        with self._cv:
            self._closed = True
            handles = list(self._handles.values())
            self._cv.notify_all()
        for h in handles:
            h.cancel()
        with self._cv:
            if self._driver is not threading.current_thread():
                self._cv.wait_for(lambda: self._driver is None)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_free_pages(self) -> int:
        return self.page_manager.num_free_pages

    def metrics(self) -> dict:
        """A snapshot of the engine's counters and gauges: ``requests_submitted``,
        ``requests_finished`` (by reason: ``stop``, ``length``, ``cancelled``, ``error``),
        ``prompt_tokens``, ``generated_tokens``, ``drafted_tokens``, ``accepted_tokens``,
        ``blocks``, ``iterations``, ``queue_depth`` (requests waiting for admission),
        ``running_sequences``, ``pages_in_use``, ``pages_total``."""
        c = dict(self._counters)
        sch = self.scheduler
        return {
            "requests_submitted": c.get("requests_submitted", 0),
            "requests_finished": {k: c.get("finished_" + k, 0) for k in ("stop", "length", "cancelled", "error")},
            "prompt_tokens": c.get("prompt_tokens", 0),
            "generated_tokens": c.get("generated_tokens", 0),
            "drafted_tokens": c.get("drafted_tokens", 0),
            "accepted_tokens": c.get("accepted_tokens", 0),
            "blocks": c.get("blocks", 0),
            "iterations": c.get("iterations", 0),
            "queue_depth": len(self._inbox) + len(sch.waiting),
            "running_sequences": len(sch.running),
            "pages_in_use": self.page_manager.num_pages - self.page_manager.num_free_pages,
            "pages_total": self.page_manager.num_pages,
        }

    # ------------------------------------------------------------------ the loop
    def _submit(self, ids: list, params: SamplingParams, mode: str, gamma, free_token: bool, request_id,
                wants_text: bool, bounded: bool, sink=None, start: bool = True) -> RequestHandle:
        """Queue a checked request (``check_request``); ``sink(event, exception)``, when given, is
        called on the loop thread instead of buffering the handle's events (AsyncEngine).
        ``start``: start the background loop thread when no thread drives the loop (False: the
        caller drives it, see :meth:`_drive_until`)."""
        auto = gamma == "auto"
        m = MODE_TABLE[mode]
        gmax = (self.model.router.config.gamma_max if auto else int(gamma)) if m.drafts else 0
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        stops = set(params.stop_token_ids)
        eos = self.model.config.primary.eos_token_id
        if eos is not None and not params.ignore_eos:
            stops.add(eos)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
            elif request_id in self._handles:
                raise ValueError(f"request_id {request_id!r} is already live")
            if bounded and self.max_queued_requests is not None and \
                    len(self._inbox) + len(self.scheduler.waiting) >= self.max_queued_requests:
                raise EngineOverloaded(f"{self.max_queued_requests} requests are already queued (max_queued_requests)")
            handle = RequestHandle(request_id, params.n, wants_text=wants_text, sink=sink)
            req = Request(request_id, ids, params, m, gmax, auto and m.drafts, free_token, seed, stops, handle,
                          self._block_slack(mode, gmax))
            self._handles[request_id] = handle
            self._inbox.append(req)
            self._counters["requests_submitted"] += 1
            self._counters["prompt_tokens"] += len(ids)
            if start:
                self._start_background_locked()
            self._cv.notify_all()
        return handle

    # Who runs the iterations: one thread at a time, the *driver*: the engine's background loop
    # thread (started by submit when no thread drives), a thread blocked in generate() (it drives
    # while its own requests are live, serving every other request too, then hands over to the
    # background thread if requests remain), or a thread in run_loop(). OpenMP parallel regions
    # (the CPU kernels' threads) cost about 0.1 ms more each on a thread other than the process's
    # first one, so a driver on the main thread is what makes torch threads > 1 pay.
    def _start_background_locked(self) -> None:
        if self._driver is None and not self._yield:
            self._num_threads = torch.get_num_threads()
            self._driver = threading.Thread(target=self._loop, name="tandem_rt-engine", daemon=True)
            self._background = True
            self._driver.start()

    def _take_inbox_locked(self) -> bool:
        while self._inbox:
            self.scheduler.waiting.append(self._inbox.popleft())
        return self.scheduler.has_work()

    def _release_driver(self) -> None:
        """The current driver stops: hand over to the background thread if requests remain."""
        with self._cv:
            self._driver, self._background = None, False
            if self._take_inbox_locked():
                self._start_background_locked()
            self._cv.notify_all()

    def _safe_iteration(self) -> None:
        try:
            self._iteration()
        except Exception as exc:  # a bug outside the steps: end every request, keep serving
            self._fail(self.scheduler.live_requests(), exc)

    def _loop(self) -> None:
        """The background loop thread: iterations while any request is live, then exit."""
        torch.set_num_threads(self._num_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.no_grad():
            while True:
                with self._cv:
                    if self._yield or not self._take_inbox_locked():
                        self._driver, self._background = None, False
                        self._cv.notify_all()
                        return
                self._safe_iteration()

    def _drive_until(self, done) -> bool:
        """Run iterations on the calling thread until ``done()``, if no other thread drives the
        loop (-> True); False when another thread drives it (the caller then just waits)."""
        with self._cv:
            if self._driver is not None:
                return False
            self._driver, self._background = threading.current_thread(), False
        try:
            with torch.no_grad():
                while not done():
                    with self._cv:
                        if not self._take_inbox_locked():
                            break
                    self._safe_iteration()
        finally:
            self._release_driver()
        return True

    def run_loop(self, stop: Optional[threading.Event] = None) -> None:
        """Serve every request on the calling thread until ``stop`` is set (None: until
        :meth:`close`), waiting for requests when there are none; other threads only submit.
        On the CPU with several torch threads, call it from the process's main thread (e.g. run
        the HTTP server in another thread, as ``tandem-rt serve`` does). The background loop
        thread, if running, hands the loop over at its next iteration boundary; a thread blocked in
        ``generate`` keeps it until its requests end."""
        with self._cv:
            if self._driver is threading.current_thread():
                raise RuntimeError("run_loop called from the thread that runs this engine's loop")
            while self._driver is not None:
                self._yield = self._background
                self._cv.wait(timeout=0.05)
            self._yield = False
            self._driver, self._background = threading.current_thread(), False
        try:
            with torch.no_grad():
                while not (stop is not None and stop.is_set()):
                    with self._cv:
                        work = self._take_inbox_locked()
                        if not work:
                            if self._closed:
                                break
                            self._cv.wait(timeout=0.05)
                            continue
                    self._safe_iteration()
        finally:
            self._release_driver()

    def _deliver(self, events) -> None:
        for r, ev in events:
            if ev.finished:
                self._counters["finished_" + ev.finish_reason] += 1
            r.handle._deliver(ev)
            if r.handle.done:
                self._handles.pop(r.request_id, None)

    def _fail(self, reqs, exc: BaseException) -> None:
        """End ``reqs`` with ``exc`` (their pages freed; their handles raise it)."""
        for r in reqs:
            self.scheduler.end_request(r, "error")
            self._counters["finished_error"] += r.params.n
            self._handles.pop(r.request_id, None)
            r.handle._fail(exc)

    def _iteration(self) -> None:
        """Cancellations, admission (prefill, first tokens), then one step per kind of step."""
        sch, runner = self.scheduler, self.runner
        self._counters["iterations"] += 1
        for r in sch.live_requests():
            if r.cancelled:
                self._deliver((r, ev) for ev in sch.end_request(r, "cancelled"))
        for r in sch.admit():
            try:
                if r.mode.step != "verify":      # prefilled alone (dense); verify modes ride in the step
                    r.logits = steps.prefill(runner, r.sid, r.prompt, r.mode, self.dense_prefill, self.prefill_chunk)
                elif r.mode.drafter == "drafter":   # the standalone drafter's own pool
                    steps.prefill_pool(runner, "drafter", r.sid, r.prompt, self.dense_prefill, self.prefill_chunk)
            except Exception as exc:
                self._fail([r], exc)
        events = []
        for r, seqs, logits in sch.fork():
            if r.mode.step == "tandem" and not r.free_token:
                continue          # the secondary generates the first token
            try:
                toks = steps.first_tokens(logits, seqs)
            except Exception as exc:
                self._fail([r], exc)
                continue
            for s, t in zip(seqs, toks):
                events.append((r, sch.commit(s, steps.Commit([t], plen=s.plen, dlen=s.dlen))))
        self._count(events)
        sch.retire()              # pages freed before the final events reach their callers
        self._deliver(events)
        router = None
        if self.model.router is not None:
            rc = self.model.router.config
            min_accept = self.step_costs.min_accept() if self.draft_policy == "cost" else 0.0
            router = (self.model.router, self.router_top_k, rc.threshold, min_accept)
        lag = self.router_lag if self.router_lag is not None else self.device.type == "cuda"
        for kind, step in (("verify", steps.speculative_step), ("tandem", steps.tandem_step),
                           ("decode", steps.decode_step)):
            seqs = [s for s in sch.running if s.mode.step == kind]
            plan = sch.prompt_chunks(self.step_prompt_rows, PROMPT_CHUNK) if kind == "verify" else []
            if not seqs and not plan:
                continue
            try:
                if kind == "verify":
                    chunks = [steps.PromptChunk(r.sid, r.prompt[a:b], a, b, r.mode.refresh, b == len(r.prompt))
                              for r, a, b in plan]
                    t0 = time.perf_counter()
                    commits, prompt_logits = step(runner, seqs, router, lag, chunks)
                    if seqs and self.draft_policy == "cost":
                        self.step_costs.add(sum(c.drafted + 1 for c in commits) + sum(b - a for _, a, b in plan),
                                            time.perf_counter() - t0, sum(len(c.tokens) for c in commits))
                    self._prompts_done(plan, prompt_logits)
                else:
                    commits = step(runner, seqs) if kind == "decode" else step(runner, seqs, router, lag)
            except Exception as exc:
                self._fail(list({id(r): r for r in [s.req for s in seqs] + [p[0] for p in plan]}.values()), exc)
                continue
            events = [(s.req, sch.commit(s, c)) for s, c in zip(seqs, commits)]
            for c in commits:
                self._counters["drafted_tokens"] += c.drafted
                if c.accepted is not None:
                    self._counters["accepted_tokens"] += c.accepted
                    self._counters["blocks"] += 1
            self._count(events)
            sch.retire()
            self._deliver(events)

    def _prompts_done(self, plan, prompt_logits) -> None:
        """Record the prompt rows a speculative step processed; a finished prompt's logits let its
        samples be forked at the next iteration."""
        pm = self.page_manager
        for (r, a, b), logits in zip(plan, prompt_logits):
            r.prefilled = b
            pm.set_primary_len(r.sid, b)
            if r.mode.refresh:
                pm.set_secondary_len(r.sid, b)
            if logits is not None:
                r.logits = logits

    def _count(self, events) -> None:
        self._counters["generated_tokens"] += sum(len(ev.token_ids) for _, ev in events)
