// Op tandem_rt::paged_attention: schema, validation shared with CUDA glue, CPU implementation.
//
// Decode (one query per sequence) and verify blocks (ragged q_len per sequence, causal inside the
// block) over the paged NHD cache. Query t of sequence b sits at absolute position
// seq_lens[b] - q_len_b + t and attends keys 0..that position. GQA: query head h reads KV head
// h / (Hq / Hkv). Softmax and accumulation in fp32.
//
// CPU design: a work item is (sequence, group of KV heads); per head it holds the q_len x group
// query rows, so each K/V row is read (and converted to fp32) once per item. Keys are processed in
// chunks of kChunk (outer loop; heads inner, so memory is read in address order) with an online
// softmax (inner kernels: ops/attention_chunk_cpu.h). With AVX-512, items with many rows (verify
// blocks x GQA group) use the rows-in-lanes kernel (16 query rows per vector); without it, verify
// blocks over long contexts use torch's GEMM on gathered K/V (attend_gemm). Items run in parallel
// with team::parallel_for (at::parallel_for outside a decoder plan's team; needs -fopenmp, see
// CMakeLists.txt).
#include "ops/direct.h"
#include "common/check.h"
#include "ops/paged_attention.h"
#include "ops/rope_cache.h"
#include "ops/attention_chunk_cpu.h"

#include "ops/team.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace tandem_rt {

void validate_paged_attention_options(int64_t kernel, int64_t waves) {
  TORCH_CHECK_VALUE(kernel == 0 || kernel == 1, "kernel must be 0 (SIMT) or 1 (tensor cores), got ", kernel);
  TORCH_CHECK_VALUE(waves >= 0 && waves <= 1024, "waves must be in 0..1024 (0: the default), got ", waves);
}

void validate_paged_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, double scale, int64_t max_q_len,
                              int64_t max_seq_len) {
  const auto device = q.device();
  check_rank(q, "q", 3);
  TORCH_CHECK_VALUE(is_float_kv_dtype(q.scalar_type()), "q must be float32, float16 or bfloat16, got ",
                    q.scalar_type());
  TORCH_CHECK_VALUE(heads_packed(q), "q must have packed heads (stride[-1] == 1, stride[-2] == head_dim)");
  const int64_t hq = q.size(1), d = q.size(2);
  TORCH_CHECK_VALUE(d > 0 && d % 2 == 0, "q head_dim must be even and positive, got ", d);
  check_device(out, "out", device);
  check_dtype(out, "out", q.scalar_type());
  check_contiguous(out, "out");
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_device(*t, name, device);
    check_dtype(*t, name, q.scalar_type());
    check_rank(*t, name, 4);
    check_contiguous(*t, name);
    check_size(*t, name, 3, d);
  }
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) > 0 && k_cache.size(1) > 0 && hkv > 0,
                    "k_cache must have at least one page, slot and head, got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(hq > 0 && hq % hkv == 0, "q heads (", hq, ") must be a positive multiple of k_cache heads (",
                    hkv, ")");
  check_device(block_tables, "block_tables", device);
  check_dtype(block_tables, "block_tables", at::kInt);
  check_rank(block_tables, "block_tables", 2);
  check_contiguous(block_tables, "block_tables");
  const int64_t b = block_tables.size(0);
  check_device(seq_lens, "seq_lens", device);
  check_dtype(seq_lens, "seq_lens", at::kInt);
  check_rank(seq_lens, "seq_lens", 1);
  check_contiguous(seq_lens, "seq_lens");
  check_size(seq_lens, "seq_lens", 0, b);
  check_device(query_start_loc, "query_start_loc", device);
  check_dtype(query_start_loc, "query_start_loc", at::kInt);
  check_rank(query_start_loc, "query_start_loc", 1);
  check_contiguous(query_start_loc, "query_start_loc");
  check_size(query_start_loc, "query_start_loc", 0, b + 1);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(max_q_len >= 0, "max_q_len must be >= 0, got ", max_q_len);
  TORCH_CHECK_VALUE(max_seq_len >= 0, "max_seq_len must be >= 0, got ", max_seq_len);
}

void validate_paged_attention_indices(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_tables,
                                      const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                      int64_t max_q_len, int64_t max_seq_len) {
  const int64_t b = seq_lens.size(0), ntok = q.size(0), max_pages = block_tables.size(1);
  const int64_t num_pages = k_cache.size(0), page_size = k_cache.size(1);
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(qsl[0] == 0, "query_start_loc[0] must be 0, got ", qsl[0]);
  TORCH_CHECK_VALUE(qsl[b] == ntok, "query_start_loc[-1] must equal q.shape[0] = ", ntok, ", got ", qsl[b]);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t q_len = int64_t(qsl[i + 1]) - qsl[i];
    TORCH_CHECK_VALUE(q_len >= 0, "query_start_loc must be non-decreasing, got query_start_loc[", i, "] = ", qsl[i],
                      " > query_start_loc[", i + 1, "] = ", qsl[i + 1]);
    TORCH_CHECK_VALUE(q_len <= max_q_len, "max_q_len = ", max_q_len, " is smaller than the q_len ", q_len,
                      " of sequence ", i);
    TORCH_CHECK_VALUE(sl[i] >= q_len, "seq_lens[", i, "] = ", sl[i], " is smaller than its q_len ", q_len);
    TORCH_CHECK_VALUE(sl[i] <= max_seq_len, "max_seq_len = ", max_seq_len, " is smaller than seq_lens[", i,
                      "] = ", sl[i]);
    const int64_t pages = (int64_t(sl[i]) + page_size - 1) / page_size;
    TORCH_CHECK_VALUE(pages <= max_pages, "block_tables has ", max_pages, " columns but seq_lens[", i, "] = ", sl[i],
                      " needs ", pages, " pages");
    for (int64_t p = 0; p < pages; ++p) {
      const int32_t page = bt[i * max_pages + p];
      TORCH_CHECK_VALUE(page >= 0 && page < num_pages, "block_tables[", i, ", ", p, "] = ", page,
                        " is outside [0, ", num_pages, ")");
    }
  }
}

namespace {

// Verify blocks over long contexts without the rows-in-lanes kernel: gather the sequence's K/V rows
// of one KV head into contiguous fp32 matrices and let torch's GEMM do Q K^T and P V (one pass of
// softmax in between). Beats the per-key chunk kernels once rows x keys is large.
constexpr int64_t kGemmMinWork = 4096;  // rows x keys from which the GEMM path is used (q_len > 1 only)
// Rows per item up to which bf16 K/V rows are converted as they are loaded, instead of once per
// chunk into fp32 copies: 32 for the AVX-512F kernels (a verify block of 4 rows x a GQA group of 3,
// context 2048, 1 thread, SmolLM2's shape: ~500 against ~750 us; 8 rows x 3: ~880 against ~1,280),
// 8 with the AVX-512 BF16 kernel (not measured here).
constexpr int kDirectBf16MaxRows = 32;
constexpr int kDirectBf16MaxRowsDp = 8;
// AVX2 (attend_chunk8_bf16_avx2): items of up to this many rows (a verify block of 4 rows x a GQA
// group of 3) read bf16 K/V as they are; more rows convert them once per chunk, since each row widens
// every key again (SmolLM2's shape, Zen 3, 1 thread: a decode forward at context 2048 7-10% faster,
// 3-row verify the same; with 4 as the cap the 3-row verify was 7% slower; items of 24 rows reading
// bf16 were 1.5x slower).
constexpr int kDirectBf16MaxRows8 = 12;


template <typename T>
void attend_gemm(const float* qf, int M, int64_t d, int64_t seq, const int* limit, const T* kc, const T* vc,
                 const int32_t* bt_row, int64_t page_size, int64_t hkv, int64_t h, float* acc, float* lrow) {
  // qf: [M, d] scaled queries; limit: [M] exclusive key bound; bt_row: [max_pages];
  // acc: [M, d] receives the normalised output; lrow: [M] set to 1 (acc is already normalised).
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor K = at::empty({seq, d}, opts), V = at::empty({seq, d}, opts);
  float* kd = K.data_ptr<float>();
  float* vd = V.data_ptr<float>();
  for (int64_t key = 0; key < seq; ++key) {
    const int64_t page = bt_row[key / page_size];
    const int64_t base = ((page * page_size + key % page_size) * hkv + h) * d;
    for (int64_t e = 0; e < d; ++e) kd[key * d + e] = static_cast<float>(kc[base + e]);
    for (int64_t e = 0; e < d; ++e) vd[key * d + e] = static_cast<float>(vc[base + e]);
  }
  const at::Tensor Q = at::from_blob(const_cast<float*>(qf), {M, d}, opts);
  at::Tensor S = at::mm(Q, K.t());  // [M, seq], scores (queries are pre-scaled)
  float* sd = S.data_ptr<float>();
  for (int m = 0; m < M; ++m) {
    float* row = sd + m * seq;
    for (int64_t j = limit[m]; j < seq; ++j) row[j] = -std::numeric_limits<float>::infinity();
  }
  const at::Tensor P = at::softmax(S, 1);
  at::Tensor O = at::from_blob(acc, {M, d}, opts);
  at::mm_out(O, P, V);
  for (int m = 0; m < M; ++m) lrow[m] = 1.f;
}

// Keys per segment of a long sequence (row_invariant only; a multiple of kChunk).
constexpr int64_t kSegmentKeys = direct::kAttentionSegmentKeys;
static_assert(kSegmentKeys % kChunk == 0, "segments hold whole chunks");

int64_t num_segments(int64_t seq) { return std::max<int64_t>(1, (seq + kSegmentKeys - 1) / kSegmentKeys); }

// The output rows of KV heads [h0, h1) of one sequence from its ns segments' partial states
// (part: [hkv, ns, M, d + 2] of (running max, sum, unnormalised acc[d]), M = q_len x group rows),
// combined in segment order: out = sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m), m = max_s m_s.
template <typename T>
void merge_segments(const float* part, int64_t ns, int M, int64_t d, int64_t h0, int64_t h1, int64_t q0,
                    int64_t q_len, int64_t group, int64_t hq, T* op) {
  std::vector<float> a(d);
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t t = 0; t < q_len; ++t)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t row = t * group + g;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < ns; ++s) {
          const float* p = part + ((h * ns + s) * M + row) * (d + 2);
          if (p[1] > 0.f) mx = std::max(mx, p[0]);
        }
        float l = 0.f;
        std::fill(a.begin(), a.end(), 0.f);
        for (int64_t s = 0; s < ns && mx != -std::numeric_limits<float>::infinity(); ++s) {
          const float* p = part + ((h * ns + s) * M + row) * (d + 2);
          if (!(p[1] > 0.f)) continue;
          const float w = std::exp(p[0] - mx);
          l += p[1] * w;
          for (int64_t e = 0; e < d; ++e) a[e] += p[2 + e] * w;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        T* dst = op + ((q0 + t) * hq + h * group + g) * d;
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(a[e] * inv);
      }
}

// KV heads per work item: all of a sequence's heads when there are enough sequences to occupy the
// threads, else fewer, so that B x groups >= 2 x threads where the head count allows.
int64_t heads_per_item(int64_t nseq, int64_t hkv) {
  const int64_t threads = std::max<int64_t>(1, team::num_threads());
  const int64_t groups = std::clamp<int64_t>((2 * threads + nseq - 1) / nseq, 1, hkv);
  return (hkv + groups - 1) / groups;
}

template <typename T>
void paged_attention_impl(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, double scale, bool row_invariant,
                          const std::optional<at::Tensor>& scratch) {
  cpu_isa::check_variant();  // ValueError for a bad TANDEM_RT_CPU_KERNELS
  const CpuKernels kern = pick_cpu_kernels();
  const int64_t nseq = seq_lens.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = k_cache.size(2), page_size = k_cache.size(1), max_pages = block_tables.size(1);
  const int64_t group = hq / hkv, q_stride = q.stride(0);
  const T* qp = q.data_ptr<T>();         // [ntok, hq, d], row stride q_stride
  T* op = out.data_ptr<T>();             // [ntok, hq, d]
  const T* kc = k_cache.data_ptr<T>();   // [num_pages, page_size, hkv, d]
  const T* vc = v_cache.data_ptr<T>();   // [num_pages, page_size, hkv, d]
  const int32_t* bt = block_tables.data_ptr<int32_t>();     // [nseq, max_pages]
  const int32_t* sl = seq_lens.data_ptr<int32_t>();         // [nseq]
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();  // [nseq + 1]
  const float fscale = static_cast<float>(scale);
  constexpr bool kIsFloat = std::is_same_v<T, float>;
  constexpr bool kIsBf16 = std::is_same_v<T, c10::BFloat16>;
  const bool v16 = d % 16 == 0 && kern.attend_chunk16 != nullptr;
  const bool v8 = d % 8 == 0 && d <= kMaxDim8 && kern.attend_chunk8 != nullptr;
  const auto chunk_fn = v16 ? kern.attend_chunk16 : v8 ? kern.attend_chunk8 : kern.attend_chunk;
  const bool v16_bf16 = kIsBf16 && v16;  // decode-sized items: the bf16 kernel converts rows as it loads them
  // bf16 with AVX-512 BF16: scores by vdpbf16ps on the raw bf16 rows (queries copied unscaled)
  const bool bf16dp = kIsBf16 && d % 32 == 0 && kern.attend_chunk16_bf16dp != nullptr;
  const bool lanes_ok = d % 16 == 0 && kern.attend_chunk_lanes != nullptr;
  const int64_t hg = heads_per_item(nseq, hkv);
  const int64_t groups = (hkv + hg - 1) / hg;

  // row_invariant: sequences longer than kSegmentKeys are split into segments of keys fixed by
  // key index, one work item per (segment, group), so that one long sequence keeps every thread
  // busy; the partial softmax states go to `scratch` and the item that completes a (sequence,
  // group) last merges them in segment order (a row's arithmetic depends only on its own keys).
  bool any_long = false;
  for (int64_t b = 0; row_invariant && b < nseq; ++b) any_long = any_long || num_segments(sl[b]) > 1;
  std::vector<int64_t> seg_seq, seg_first, part_base;  // per segment its sequence; per sequence its first segment, scratch offset
  if (any_long) {
    seg_first.assign(nseq + 1, 0);
    part_base.assign(nseq + 1, 0);
    for (int64_t b = 0; b < nseq; ++b) {
      const int64_t ns = num_segments(sl[b]);
      for (int64_t s = 0; s < ns; ++s) seg_seq.push_back(b);
      seg_first[b + 1] = seg_first[b] + ns;
      const int64_t rows_b = (int64_t(qsl[b + 1]) - qsl[b]) * group;
      part_base[b + 1] = part_base[b] + (ns > 1 ? hkv * ns * rows_b * (d + 2) : 0);
    }
  }
  const int64_t nseg = any_long ? seg_first[nseq] : nseq;
  at::Tensor parts, counts;   // [part_base[nseq]] fp32 partial states (m, l, acc[d]); int32 [nseq * groups]
  if (any_long && part_base[nseq] > 0) {
    TORCH_CHECK_VALUE(scratch.has_value() && scratch->numel() >= part_base[nseq] + nseq * groups,
                      "paged_attention: no scratch, or too small, for ", part_base[nseq] + nseq * groups,
                      " floats (paged_attention_scratch builds it)");
    parts = scratch->narrow(0, 0, part_base[nseq]);
    counts = scratch->narrow(0, scratch->numel() - nseq * groups, nseq * groups);   // the zeroed tail
  }
  float* pp = parts.defined() ? parts.data_ptr<float>() : nullptr;                                   // partial states
  int32_t* cp = counts.defined() ? reinterpret_cast<int32_t*>(counts.data_ptr<float>()) : nullptr;  // completed segments

  // Work item = (sequence, group of KV heads). Chunks of keys are the outer loop and the heads the
  // inner one, so a chunk's K/V slots (hkv x d contiguous elements each) are read in address order,
  // which the hardware prefetchers follow; per-head loops would stride hkv x d between keys.
  team::parallel_for(0, nseg * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, qt, s, mrow, lrow, acc, kbuf, vbuf;
    std::vector<uint16_t> qh;   // [nh, M, d] bf16 query rows (bf16dp only)
    std::vector<const float*> kptr(kChunk), vptr(kChunk);
    std::vector<const uint16_t*> kraw(kChunk), vraw(kChunk);
    std::vector<int64_t> slot(kChunk);
    std::vector<int> nvalid, limit;
    if (!kIsFloat) {
      kbuf.resize(kChunk * d);
      vbuf.resize(kChunk * d);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sg = item / groups, b = any_long ? seg_seq[sg] : sg;
      const int64_t seg = any_long ? sg - seg_first[b] : 0, ns = any_long ? seg_first[b + 1] - seg_first[b] : 1;
      const int64_t gi = item % groups;
      const int64_t h0 = gi * hg, h1 = std::min(hkv, h0 + hg), nh = h1 - h0;
      const int64_t q0 = qsl[b], q_len = int64_t(qsl[b + 1]) - q0, seq = sl[b];
      const int64_t k0 = seg * kSegmentKeys, k1 = ns > 1 ? std::min(seq, k0 + kSegmentKeys) : seq;  // its keys
      if (q_len <= 0) continue;
      const int M = static_cast<int>(q_len * group);
      // Many rows: the rows-in-lanes kernel (per-row arrays padded to 16 rows). It pays once a vector
      // holds 4 verify rows or 8 decode rows; bf16 decode stays on the vdpbf16ps chunk kernel
      // (measured on the quiet 2-core machine, docs/KERNELS.md).
      // row_invariant: every item runs the per-row chunk kernels (no rows-in-lanes, no GEMM), so a
      // query row's arithmetic depends only on its own position: a verify row gives its decode value.
      const bool lanes = !row_invariant && lanes_ok && (q_len > 1 ? M >= 4 : (M >= 8 && !bf16dp));
      const int Ms = lanes ? (M + 15) / 16 * 16 : M;
      // per head i of the item: qf/acc [nh, Ms, d], mrow/lrow [nh, Ms] (rows >= M unused padding);
      // qt [nh, d, Ms] (lanes only); s is scratch of one chunk call
      qf.resize(nh * Ms * d);
      s.resize(std::max(M, Ms) * kChunk);
      acc.assign(nh * Ms * d, 0.f);
      mrow.assign(nh * Ms, -std::numeric_limits<float>::infinity());
      lrow.assign(nh * Ms, 0.f);
      nvalid.assign(Ms, 0);
      limit.resize(M);
      for (int64_t i = 0; i < nh; ++i) {
        for (int64_t t = 0; t < q_len; ++t) {
          for (int64_t g = 0; g < group; ++g) {
            const int64_t row = t * group + g;
            const T* src = qp + (q0 + t) * q_stride + ((h0 + i) * group + g) * d;
            float* dst = qf.data() + (i * Ms + row) * d;
            for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<float>(src[e]) * fscale;
            if (bf16dp) {
              qh.resize(nh * M * d);
              std::memcpy(qh.data() + (i * M + row) * d, src, d * sizeof(uint16_t));
            }
            limit[row] = static_cast<int>(seq - q_len + t + 1);
          }
        }
      }
      if (lanes) {
        qt.assign(nh * d * Ms, 0.f);
        for (int64_t i = 0; i < nh; ++i)
          for (int m = 0; m < M; ++m)
            for (int64_t e = 0; e < d; ++e) qt[(i * d + e) * Ms + m] = qf[(i * Ms + m) * d + e];
      }
      // Verify blocks over long contexts go through torch's GEMM (faster than the chunk kernels
      // with 2 threads, measured on a quiet machine).
      const bool gemm = !row_invariant && !lanes && q_len > 1 && static_cast<int64_t>(M) * seq >= kGemmMinWork;
      // Up to kDirectBf16MaxRows rows: convert bf16 K/V while scoring; more rows: once per chunk.
      const bool bf16_direct = v16_bf16 && M <= (bf16dp ? kDirectBf16MaxRowsDp : kDirectBf16MaxRows);
      for (int64_t i = 0; gemm && i < nh; ++i) {
        attend_gemm<T>(qf.data() + i * Ms * d, M, d, seq, limit.data(), kc, vc, bt + b * max_pages, page_size, hkv,
                       h0 + i, acc.data() + i * Ms * d, lrow.data() + i * Ms);
      }
      for (int64_t c0 = k0; !gemm && c0 < k1; c0 += kChunk) {
        const int n = static_cast<int>(std::min<int64_t>(kChunk, k1 - c0));
        for (int j = 0; j < n; ++j) {
          const int64_t key = c0 + j;
          slot[j] = (int64_t(bt[b * max_pages + key / page_size]) * page_size + key % page_size) * hkv * d;
        }
        for (int m = 0; m < M; ++m) nvalid[m] = std::clamp(limit[m] - static_cast<int>(c0), 0, n);
        for (int64_t i = 0; i < nh; ++i) {
          const int64_t head = (h0 + i) * d;
          for (int j = 0; j < n; ++j) {
            const int64_t base = slot[j] + head;
            if constexpr (kIsFloat) {
              kptr[j] = kc + base;
              vptr[j] = vc + base;
            } else if constexpr (kIsBf16) {
              kraw[j] = reinterpret_cast<const uint16_t*>(kc + base);
              vraw[j] = reinterpret_cast<const uint16_t*>(vc + base);
              kptr[j] = kbuf.data() + j * d;
              vptr[j] = vbuf.data() + j * d;
            } else {
              float* kd = kbuf.data() + j * d;
              float* vd = vbuf.data() + j * d;
              for (int64_t e = 0; e < d; ++e) kd[e] = static_cast<float>(kc[base + e]);
              for (int64_t e = 0; e < d; ++e) vd[e] = static_cast<float>(vc[base + e]);
              kptr[j] = kd;
              vptr[j] = vd;
            }
          }
          const ChunkArgs args{qf.data() + i * Ms * d, kptr.data(), vptr.data(), nvalid.data(), s.data(),
                               mrow.data() + i * Ms, lrow.data() + i * Ms, acc.data() + i * Ms * d, M,
                               static_cast<int>(d), n, kraw.data(), vraw.data()};
          if (lanes) {
            if constexpr (kIsBf16) {
              kern.bf16_rows(kraw.data(), n, static_cast<int>(d), kbuf.data());
              kern.bf16_rows(vraw.data(), n, static_cast<int>(d), vbuf.data());
            }
            ChunkArgs la = args;
            la.qt = qt.data() + i * d * Ms;
            la.Mp = Ms;
            kern.attend_chunk_lanes(la);
            continue;
          }
          if (bf16dp) {
            ChunkArgs dp = args;
            dp.qh = qh.data() + i * M * d;
            dp.qscale = fscale;
            // many rows, no bf16 P V: convert V once, read it as fp32 (row_invariant: for every item)
            if ((row_invariant || !bf16_direct) && d % 64 != 0) {
              kern.bf16_rows(vraw.data(), n, static_cast<int>(d), vbuf.data());
              dp.vh = nullptr;
            }
            kern.attend_chunk16_bf16dp(dp);
            continue;
          }
          if (bf16_direct) {
            kern.attend_chunk16_bf16(args);
            continue;
          }
          if constexpr (kIsBf16) {
            if (!v16 && v8 && M <= kDirectBf16MaxRows8) {  // exact widening: the same results as converted
              kern.attend_chunk8_bf16(args);
              continue;
            }
            kern.bf16_rows(kraw.data(), n, static_cast<int>(d), kbuf.data());
            kern.bf16_rows(vraw.data(), n, static_cast<int>(d), vbuf.data());
          }
          chunk_fn(args);
        }
      }
      if (ns > 1) {  // a segment: its partial states, and the merge by the item that completes (b, group)
        for (int64_t i = 0; i < nh; ++i)
          for (int m = 0; m < M; ++m) {
            float* dst = pp + part_base[b] + (((h0 + i) * ns + seg) * M + m) * (d + 2);
            dst[0] = mrow[i * Ms + m];
            dst[1] = lrow[i * Ms + m];
            std::memcpy(dst + 2, acc.data() + (i * Ms + m) * d, d * sizeof(float));
          }
        std::atomic_ref<int32_t> done(cp[b * groups + gi]);
        if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == ns) {
          merge_segments<T>(pp + part_base[b], ns, M, d, h0, h1, q0, q_len, group, hq, op);
          done.store(0, std::memory_order_relaxed);   // ready for the next call
        }
        continue;
      }
      for (int64_t i = 0; i < nh; ++i) {
        for (int64_t t = 0; t < q_len; ++t) {
          for (int64_t g = 0; g < group; ++g) {
            const int64_t row = t * group + g;
            T* dst = op + ((q0 + t) * hq + (h0 + i) * group + g) * d;
            const float l = lrow[i * Ms + row];
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const float* a = acc.data() + (i * Ms + row) * d;
            for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(a[e] * inv);
          }
        }
      }
    }
  });
}

void paged_attention_run(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t max_q_len, int64_t max_seq_len,
                         bool row_invariant, int64_t kernel, int64_t waves,
                         const std::optional<at::Tensor>& scratch) {
  validate_paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_q_len,
                           max_seq_len);
  validate_paged_attention_options(kernel, waves);  // CUDA options: checked, not used on the CPU
  validate_paged_attention_indices(q, k_cache, block_tables, seq_lens, query_start_loc, max_q_len, max_seq_len);
  if (q.size(0) == 0) return;
  std::optional<at::Tensor> own;   // a call outside a team allocates its own key-segment scratch
  if (row_invariant && !scratch.has_value()) {
    own = direct::paged_attention_scratch(q.size(0), seq_lens.size(0), q.size(1), q.size(2), max_seq_len);
    TORCH_CHECK(!own.has_value() || team::current().mode != team::Mode::kSplit,
                "paged_attention: a team of threads must pass the shared scratch");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention_cpu", [&] {
    paged_attention_impl<scalar_t>(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                   row_invariant, scratch.has_value() ? scratch : own);
  });
}

// The dispatcher's CPU kernel (torch.ops.tandem_rt.paged_attention): the op allocates its scratch.
void paged_attention_cpu(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t max_q_len, int64_t max_seq_len,
                         bool row_invariant, int64_t kernel, int64_t waves) {
  paged_attention_run(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_q_len,
                      max_seq_len, row_invariant, kernel, waves, std::nullopt);
}

}  // namespace

namespace direct {
void paged_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                     double scale, int64_t max_q_len, int64_t max_seq_len, bool row_invariant,
                     const std::optional<at::Tensor>& scratch) {
  if (scratch.has_value()) {   // paged_attention_scratch's layout (its size is checked where it is used)
    check_device(*scratch, "scratch", q.device());
    check_dtype(*scratch, "scratch", at::kFloat);
    check_rank(*scratch, "scratch", 1);
    check_contiguous(*scratch, "scratch");
  }
  paged_attention_run(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_q_len,
                      max_seq_len, row_invariant, 0, 0, scratch);
}

std::optional<at::Tensor> paged_attention_scratch(int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                                                  int64_t head_dim, int64_t max_seq_len) {
  if (num_segments(max_seq_len) <= 1) return std::nullopt;
  // partial states (max, sum, acc[head_dim]) of every row, head and segment, then one count per
  // (sequence, head) at the tail, zero
  const int64_t counts = num_seqs * num_heads;
  const int64_t n = num_segments(max_seq_len) * num_tokens * num_heads * (head_dim + 2) + counts;
  at::Tensor s = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  s.narrow(0, n - counts, counts).zero_();
  return s;
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_start_loc, float scale, int max_q_len, int max_seq_len, "
        "bool row_invariant=False, int kernel=0, int waves=0) -> ()");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
}

}  // namespace tandem_rt
