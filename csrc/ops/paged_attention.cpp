// Op tandem_rt::paged_attention: schema, validation shared with CUDA glue, CPU implementation.
//
// Decode (one query per sequence) and verify blocks (ragged q_len per sequence, causal inside the
// block) over the paged NHD cache. Query t of sequence b sits at absolute position
// seq_lens[b] - q_len_b + t and attends keys 0..that position. GQA: query head h reads KV head
// h / (Hq / Hkv). Softmax and accumulation in fp32.
//
// CPU design: one work item per (sequence, KV head) holds the q_len x group query rows, so each K/V
// row is read (and converted to fp32) once per item; keys are processed in chunks of kChunk with an
// online softmax. The fp32 inner loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and
// chosen once at run time.
#include "common/check.h"
#include "ops/paged_attention.h"
#include "ops/rope_cache.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace tandem_rt {

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

constexpr int kChunk = 128;  // keys per online-softmax step
constexpr int kPrefetch = 8;  // rows ahead: K/V rows of a KV head are scattered (stride Hkv * D, pages)

__attribute__((always_inline)) inline void prefetch_row(const void* p, int64_t bytes, bool to_l1) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (to_l1) {
      __builtin_prefetch(c + off, 0, 3);
    } else {
      __builtin_prefetch(c + off, 0, 2);
    }
  }
}

// One chunk of keys for the M query rows of a work item (all pointers fp32).
struct ChunkArgs {
  const float* q;          // [M, D] query rows, pre-multiplied by the softmax scale
  const float* const* k;   // [n] pointers to key rows, D floats each
  const float* const* v;   // [n] pointers to value rows, D floats each
  const int* nvalid;       // [M] keys of this chunk row m may attend (causal), in [0, n]
  float* s;                // [M, kChunk] scratch: scores, then probabilities
  float* mrow;             // [M] running max
  float* lrow;             // [M] running denominator
  float* acc;              // [M, D] running unnormalised output
  int M, D, n;
  bool prefetch;           // k/v point into the cache (fp32): prefetch rows ahead
};

// exp(x) for x <= 0 (Cephes polynomial, ~2 ulp), written so that the compiler vectorises it.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  return y * std::bit_cast<float>(bits);
}

__attribute__((always_inline)) inline void attend_chunk_body(const ChunkArgs& a) {
  const int M = a.M, D = a.D, n = a.n;
  // Scores: four query rows per pass share each key row load.
  for (int j = 0; j < n; ++j) {
    const float* __restrict kr = a.k[j];
    if (a.prefetch) {
      if (j + kPrefetch < n) prefetch_row(a.k[j + kPrefetch], D * 4, true);
      prefetch_row(a.v[j], D * 4, false);
    }
    int m = 0;
    for (; m + 4 <= M; m += 4) {
      const float* __restrict q0 = a.q + m * D;
      const float* __restrict q1 = q0 + D;
      const float* __restrict q2 = q1 + D;
      const float* __restrict q3 = q2 + D;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int d = 0; d < D; ++d) {
        const float kv = kr[d];
        s0 += q0[d] * kv;
        s1 += q1[d] * kv;
        s2 += q2[d] * kv;
        s3 += q3[d] * kv;
      }
      a.s[m * kChunk + j] = s0;
      a.s[(m + 1) * kChunk + j] = s1;
      a.s[(m + 2) * kChunk + j] = s2;
      a.s[(m + 3) * kChunk + j] = s3;
    }
    for (; m < M; ++m) {
      const float* __restrict q0 = a.q + m * D;
      float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
      for (int d = 0; d < D; ++d) s0 += q0[d] * kr[d];
      a.s[m * kChunk + j] = s0;
    }
  }
  // Online softmax per row.
  for (int m = 0; m < M; ++m) {
    const int nv = a.nvalid[m];
    if (nv <= 0) continue;
    float* __restrict row = a.s + m * kChunk;
    float mx = a.mrow[m];
#pragma omp simd reduction(max : mx)
    for (int j = 0; j < nv; ++j) mx = std::max(mx, row[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < nv; ++j) {
      const float p = exp_nonpos(row[j] - mx);
      row[j] = p;
      sum += p;
    }
    const float old = a.mrow[m];
    const float alpha = old == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(old - mx);
    a.lrow[m] = a.lrow[m] * alpha + sum;
    a.mrow[m] = mx;
    if (alpha != 1.f) {
      float* __restrict acc = a.acc + m * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] *= alpha;
    }
  }
  // acc += P V, one value row at a time.
  for (int j = 0; j < n; ++j) {
    const float* __restrict vr = a.v[j];
    for (int m = 0; m < M; ++m) {
      if (j >= a.nvalid[m]) continue;
      const float p = a.s[m * kChunk + j];
      float* __restrict acc = a.acc + m * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += p * vr[d];
    }
  }
}

// bf16 rows (raw bits) -> fp32 rows: dst [n, D].
__attribute__((always_inline)) inline void bf16_rows_body(const uint16_t* const* src, int n, int D, float* dst) {
  for (int j = 0; j < n; ++j) {
    const uint16_t* __restrict s = src[j];
    float* __restrict o = dst + static_cast<int64_t>(j) * D;
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] = std::bit_cast<float>(static_cast<uint32_t>(s[d]) << 16);
  }
}

#define TANDEM_CPU_VARIANT(suffix, attr)                                                                  \
  attr void attend_chunk_##suffix(const ChunkArgs& a) { attend_chunk_body(a); }                          \
  attr void bf16_rows_##suffix(const uint16_t* const* src, int n, int D, float* dst) {                   \
    bf16_rows_body(src, n, D, dst);                                                                      \
  }
#if defined(__x86_64__) && defined(__GNUC__)
TANDEM_CPU_VARIANT(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
TANDEM_CPU_VARIANT(avx2, __attribute__((target("avx2,fma"))))
#endif
TANDEM_CPU_VARIANT(base, )
#undef TANDEM_CPU_VARIANT

struct CpuKernels {
  void (*attend_chunk)(const ChunkArgs&);
  void (*bf16_rows)(const uint16_t* const*, int, int, float*);
};

CpuKernels pick_cpu_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return {&attend_chunk_avx512, &bf16_rows_avx512};
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {&attend_chunk_avx2, &bf16_rows_avx2};
#endif
  return {&attend_chunk_base, &bf16_rows_base};
}

// Verify blocks over long contexts: gather the sequence's K/V rows of one KV head into contiguous fp32 matrices and
// let torch's GEMM do Q K^T and P V (one pass of softmax in between). Beats per-key dot products
// once rows x keys is large; the gather is one extra pass over K/V that stays in cache per head.
constexpr int64_t kGemmMinWork = 4096;  // rows x keys from which the GEMM path is used (q_len > 1 only:
                                        // for decode the gather costs more than the GEMM saves, measured)

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

template <typename T>
void paged_attention_impl(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, double scale) {
  static const CpuKernels kern = pick_cpu_kernels();
  const int64_t nseq = seq_lens.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = k_cache.size(2), page_size = k_cache.size(1), max_pages = block_tables.size(1);
  const int64_t group = hq / hkv, q_stride = q.stride(0);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const float fscale = static_cast<float>(scale);
  constexpr bool kIsFloat = std::is_same_v<T, float>;
  constexpr bool kIsBf16 = std::is_same_v<T, c10::BFloat16>;

  at::parallel_for(0, nseq * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, s, mrow, lrow, acc, kbuf, vbuf;
    std::vector<const float*> kptr(kChunk), vptr(kChunk);
    std::vector<const uint16_t*> kraw(kChunk), vraw(kChunk);
    std::vector<int> nvalid, limit;
    if (!kIsFloat) {
      kbuf.resize(kChunk * d);
      vbuf.resize(kChunk * d);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / hkv, h = item % hkv;
      const int64_t q0 = qsl[b], q_len = int64_t(qsl[b + 1]) - q0, seq = sl[b];
      if (q_len <= 0) continue;
      const int M = static_cast<int>(q_len * group);
      qf.resize(M * d);
      s.resize(M * kChunk);
      acc.assign(M * d, 0.f);
      mrow.assign(M, -std::numeric_limits<float>::infinity());
      lrow.assign(M, 0.f);
      nvalid.resize(M);
      limit.resize(M);
      for (int64_t t = 0; t < q_len; ++t) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row = t * group + g;
          const T* src = qp + (q0 + t) * q_stride + (h * group + g) * d;
          for (int64_t e = 0; e < d; ++e) qf[row * d + e] = static_cast<float>(src[e]) * fscale;
          limit[row] = static_cast<int>(seq - q_len + t + 1);
        }
      }
      const bool gemm = q_len > 1 && static_cast<int64_t>(M) * seq >= kGemmMinWork;
      if (gemm) {
        lrow.resize(M);
        attend_gemm<T>(qf.data(), M, d, seq, limit.data(), kc, vc, bt + b * max_pages, page_size, hkv, h,
                       acc.data(), lrow.data());
      }
      for (int64_t c0 = 0; !gemm && c0 < seq; c0 += kChunk) {
        const int n = static_cast<int>(std::min<int64_t>(kChunk, seq - c0));
        auto row_base = [&](int64_t key) {
          const int64_t page = bt[b * max_pages + key / page_size];
          return ((page * page_size + key % page_size) * hkv + h) * d;
        };
        for (int j = 0; j < n; ++j) {
          const int64_t key = c0 + j;
          const int64_t base = row_base(key);
          if constexpr (kIsFloat) {
            kptr[j] = kc + base;
            vptr[j] = vc + base;
          } else if constexpr (kIsBf16) {
            if (key + kPrefetch < seq) {
              const int64_t ahead = row_base(key + kPrefetch);
              prefetch_row(kc + ahead, d * sizeof(T), true);
              prefetch_row(vc + ahead, d * sizeof(T), true);
            }
            kraw[j] = reinterpret_cast<const uint16_t*>(kc + base);
            vraw[j] = reinterpret_cast<const uint16_t*>(vc + base);
            kptr[j] = kbuf.data() + j * d;
            vptr[j] = vbuf.data() + j * d;
          } else {
            if (key + kPrefetch < seq) {
              const int64_t ahead = row_base(key + kPrefetch);
              prefetch_row(kc + ahead, d * sizeof(T), true);
              prefetch_row(vc + ahead, d * sizeof(T), true);
            }
            float* kd = kbuf.data() + j * d;
            float* vd = vbuf.data() + j * d;
            for (int64_t e = 0; e < d; ++e) kd[e] = static_cast<float>(kc[base + e]);
            for (int64_t e = 0; e < d; ++e) vd[e] = static_cast<float>(vc[base + e]);
            kptr[j] = kd;
            vptr[j] = vd;
          }
        }
        if constexpr (kIsBf16) {
          kern.bf16_rows(kraw.data(), n, static_cast<int>(d), kbuf.data());
          kern.bf16_rows(vraw.data(), n, static_cast<int>(d), vbuf.data());
        }
        for (int m = 0; m < M; ++m) nvalid[m] = std::clamp(limit[m] - static_cast<int>(c0), 0, n);
        kern.attend_chunk(ChunkArgs{qf.data(), kptr.data(), vptr.data(), nvalid.data(), s.data(), mrow.data(), lrow.data(),
                           acc.data(), M, static_cast<int>(d), n, kIsFloat});
      }
      for (int64_t t = 0; t < q_len; ++t) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row = t * group + g;
          T* dst = op + ((q0 + t) * hq + h * group + g) * d;
          const float inv = lrow[row] > 0.f ? 1.f / lrow[row] : 0.f;
          for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(acc[row * d + e] * inv);
        }
      }
    }
  });
}

void paged_attention_cpu(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t max_q_len, int64_t max_seq_len) {
  validate_paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_q_len,
                           max_seq_len);
  validate_paged_attention_indices(q, k_cache, block_tables, seq_lens, query_start_loc, max_q_len, max_seq_len);
  if (q.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention_cpu", [&] {
    paged_attention_impl<scalar_t>(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_rt, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_start_loc, float scale, int max_q_len, int max_seq_len) -> ()");
}

TORCH_LIBRARY_IMPL(tandem_rt, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
}

}  // namespace tandem_rt
