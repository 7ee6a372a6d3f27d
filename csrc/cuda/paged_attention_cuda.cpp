// CUDA dispatch for tandem_rt::paged_attention (glue only: kernels live in kernels/paged_attention.cu
// and kernels/paged_attention_mma.cu).
// Chooses the KV split from max_seq_len and the SM count, allocates the fp32 partial-result
// workspace through the caching allocator (graph-capture safe) and launches; no host sync.
// The attention kernel is the op's `kernel` argument: 0 -> SIMT kernel (default); 1 -> tensor-core
// kernel for fp16/bf16 (fp32 keeps the SIMT kernel). `waves` (0: the default) sets the KV split.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "common/check.h"
#include "cuda/kv_dtype_cuda.h"
#include "kernels/paged_attention.h"
#include "ops/paged_attention.h"

namespace tandem_rt {
namespace {

void paged_attention_cuda(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, double scale, int64_t max_q_len, int64_t max_seq_len,
                          bool /*row_invariant: CPU only (the CUDA kernels' per-row arithmetic follows the
                                 launch shape)*/,
                          int64_t kernel_option, int64_t waves) {
  validate_paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_q_len,
                           max_seq_len);
  validate_paged_attention_options(kernel_option, waves);
  const int64_t d = q.size(2);
  TORCH_CHECK_VALUE(kernels::paged_attention_head_dim_supported(static_cast<int>(d)), "head_dim ", d,
                    " is not supported by the CUDA paged_attention kernel (supported: 32, 64, 128)");
  const kernels::PagedAttentionKernel kernel =
      kernel_option == 1 ? kernels::kPagedAttentionMma : kernels::kPagedAttentionSimt;
  const int64_t elem = q.element_size();
  TORCH_CHECK_VALUE(aligned16(q.data_ptr()) && (q.stride(0) * elem) % 16 == 0,
                    "q rows must start at 16-byte aligned addresses");
  TORCH_CHECK_VALUE(aligned16(out.data_ptr()), "out must be 16-byte aligned");
  TORCH_CHECK_VALUE(aligned16(k_cache.data_ptr()), "k_cache must be 16-byte aligned");
  TORCH_CHECK_VALUE(aligned16(v_cache.data_ptr()), "v_cache must be 16-byte aligned");
  const int64_t nseq = seq_lens.size(0), ntok = q.size(0);
  TORCH_CHECK_VALUE(nseq <= 65535, "at most 65535 sequences per call, got seq_lens of length ", nseq);
  TORCH_CHECK_VALUE(ntok <= std::numeric_limits<int>::max(), "q has too many rows: ", ntok);
  TORCH_CHECK_VALUE(max_seq_len <= std::numeric_limits<int>::max(), "max_seq_len too large: ", max_seq_len);
  TORCH_CHECK_VALUE(max_q_len <= 65535, "max_q_len too large: ", max_q_len);
  TORCH_CHECK_VALUE(k_cache.size(0) <= std::numeric_limits<int>::max(), "k_cache has too many pages");
  if (ntok == 0 || nseq == 0 || max_q_len == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  kernels::PagedAttentionParams p{};
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.q_stride = q.stride(0);
  p.num_seqs = static_cast<int>(nseq);
  p.ntok = static_cast<int>(ntok);
  p.hq = static_cast<int>(q.size(1));
  p.hkv = static_cast<int>(k_cache.size(2));
  p.head_dim = static_cast<int>(d);
  p.page_size = static_cast<int>(k_cache.size(1));
  p.max_pages = static_cast<int>(block_tables.size(1));
  p.num_pages = static_cast<int>(k_cache.size(0));
  p.max_q_len = static_cast<int>(max_q_len);
  p.scale = static_cast<float>(scale);
  p.dtype = to_kv_dtype(q.scalar_type());
  p.kernel = p.dtype == kernels::KvDType::kFloat32 ? kernels::kPagedAttentionSimt : kernel;
  p.num_splits = kernels::paged_attention_splits(q.get_device(), p.num_seqs, p.hq, p.hkv, p.max_q_len,
                                                 static_cast<int>(max_seq_len), static_cast<int>(waves),
                                                 &p.split_len);
  at::Tensor part_out, part_ml;
  if (p.num_splits > 1) {
    const auto opts = q.options().dtype(at::kFloat);
    part_out = at::empty({p.num_splits, ntok, p.hq, d}, opts);
    part_ml = at::empty({p.num_splits, ntok, p.hq, 2}, opts);
    p.part_out = part_out.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
  }
  const auto err = kernels::launch_paged_attention(p, c10::cuda::getCurrentCUDAStream());
  // The tensor-core launcher refuses devices below sm_80 before launching anything.
  TORCH_CHECK_VALUE(!(err == cudaErrorNotSupported && p.kernel == kernels::kPagedAttentionMma),
                    "kernel=1 (tensor cores) needs a GPU of compute capability 8.0 or newer");
  TORCH_CHECK(err == cudaSuccess, "paged_attention kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem_rt, CUDA, m) {
  m.impl("paged_attention", &paged_attention_cuda);
}

}  // namespace tandem_rt
