"""Paged-KV-cache ops (``torch.ops.tandem_rt.*``) with validated, documented Python wrappers.

One module per op family. The ops validate their tensor arguments themselves (dtype, rank, shape,
contiguity, and index ranges on the CPU, where checking them needs no host sync) and raise
``ValueError`` naming the bad argument, so the engine calls them directly; the wrappers add only
what the ops cannot see: that every argument is a tensor on the first one's device (the
dispatcher picks the kernel from all of them), Python scalars and option names. No op
synchronises with the host.

Layout conventions (shared by every op):

* K/V pools per model and layer: ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD).
* ``block_tables``: int32 ``[num_seqs, max_pages_per_seq]``, one row per sequence, shared by the
  primary and the secondary pool. Slot index = ``page * page_size + offset``.
* Random state: int64 ``[2]`` device tensor ``(seed, offset)``; sampling ops advance ``offset``
  in place, so replaying a captured CUDA graph draws fresh numbers. CPU and CUDA draw the same
  numbers for the same state (counter-based Philox).

Ops:

* ``rope_cache_write(k, v, positions, slot_mapping, k_cache, v_cache, rope_theta, q=None)``
* ``paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
  max_q_len, max_seq_len, out=None, row_invariant=False, kernel="simt", waves=0) -> out``
* ``sample(logits, temperature, top_k, top_p, rng_state, probs_out=None) -> tokens``
* ``verify(draft_tokens, draft_lens, draft_probs, target_logits, temperature, top_k, top_p,
  rng_state) -> (accepted, emitted)``
* ``copy_pages(caches, src_pages, dst_pages)``
* CPU only, fused layer math for the engine: ``rms_norm(x, weight, eps)``, ``silu_and_mul(gate_up)``,
  ``linear_rows(x, w, add=None)`` (bf16 / fp32); CPU and CUDA: ``linear_rows_q(x, w_blocks, qtype,
  add=None)`` (GGUF Q8_0 / Q4_0 / Q4_1 weights kept quantized); CPU only: ``embedding_rows_q(table,
  ids, qtype, dtype)`` (rows of a quantized embedding table, dequantized)

Helpers: ``make_rng_state(seed, device)``, ``sampling_params(batch_size, temperature, top_k,
top_p, device)`` (per-row parameter tensors), ``rng_uniform(rng_state, num_subsequences,
num_draws)`` (the uniforms the sampling ops draw, for tests).
"""

from tandem_rt.ops.attention import ATTENTION_KERNELS, paged_attention  # noqa: E402,F401
from tandem_rt.ops.rope import rope_cache_write  # noqa: E402,F401
from tandem_rt.ops.sampling import make_rng_state, rng_uniform, sample, sampling_params, verify  # noqa: E402,F401
from tandem_rt.ops.pages import copy_pages  # noqa: E402,F401
from tandem_rt.ops.layer_math import embedding_rows_q, linear_rows, linear_rows_q, rms_norm, silu_and_mul  # noqa: E402,F401
