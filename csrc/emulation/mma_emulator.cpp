// Host emulator test of the tensor-core paged-attention kernel: runs the real kernel source
// (csrc/kernels/paged_attention_mma.cuh) on the CPU, one std::thread per CUDA thread
// (cuda_host_prelude.h), with the inline PTX replaced by spec-based emulations
// (mma_ptx_emulation.h), on one random paged-attention problem, and compares the output with a
// float64 reference. Exit status 0 = match, 1 = mismatch, abort = a trap fired (out-of-bounds or
// misaligned shared / global access, a write outside the outputs, a cp.async never waited for);
// SIGALRM after 120 s catches a deadlock (a barrier not reached by every thread).
//
// What the problem is made of, to make mistakes visible: pages in shuffled order; K/V slots past a
// sequence's length and unused pages hold NaN; block-table entries past the pages in use are -1 or
// out of range (2^30); shared memory starts as NaN bytes; q rows may be strided (q_extra padding
// elements per token); outputs and partials are NaN / pattern filled and guarded on both sides.
// With several KV splits the kernel's partials (part_out, part_ml) are merged here in float64 (the
// combine kernel itself is in paged_attention.cu and is covered by the GPU tests).
//
// Build (host only; C++20 for std::barrier; no strict aliasing, the kernel type-puns as nvcc allows):
//   g++ -std=c++20 -O2 -fno-strict-aliasing -pthread -I/usr/local/cuda/include -Icsrc \
//       csrc/emulation/mma_emulator.cpp -o emu
// Run: emu key=value ...  (see Case below; python_tests/test_mma_emulation.py runs the battery)
//   emu dtype=bf16 d=128 page=16 hq=8 hkv=2 qlens=1,3,0,2 seqs=37,70,5,130 split=0 q_extra=0
//       seed=1 mt=auto cp_async=wait
// fault=skip_first_wait checks the checker: every thread's first cp_async_wait_all() lands nothing
// (its copies land at the next wait), so the first K/V tile is computed from stale shared memory and
// the run must report a mismatch.
#define TANDEM_RT_MMA_EMULATION 1

#include <unistd.h>

#include <random>
#include <string>
#include <type_traits>

#include "cuda_host_prelude.h"
#include "mma_ptx_emulation.h"
#include "kernels/paged_attention_mma.cuh"

namespace {

using tandem_rt::kernels::PagedAttentionParams;

// One test case, from the command line.
struct Case {
  std::string dtype = "bf16";    // bf16 | fp16
  int d = 128;                   // head_dim: 32, 64, 128
  int page = 16;                 // page size (tokens)
  int hq = 8, hkv = 2;           // query / KV heads (group = hq / hkv)
  std::vector<int> qlens{1};     // query tokens per sequence (0 allowed)
  std::vector<int> seqs{64};     // cached tokens per sequence, queries included (>= q_len)
  int split = 0;                 // KV split length, a multiple of 64; 0 = one split
  int q_extra = 0;               // padding elements after each token's hq * d query elements
  unsigned seed = 1;
  std::string mt = "auto";       // m16 row tiles per CTA: auto (the launcher's rule) | 1 | 2
  std::string cp_async = "wait"; // when cp.async copies land: wait | issue
  std::string fault = "none";    // none | skip_first_wait: a planted emulation fault, which must fail
};

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t end = std::min(s.find(',', pos), s.size());
    v.push_back(std::stoi(s.substr(pos, end - pos)));
    pos = end + 1;
  }
  return v;
}

Case parse_case(int argc, char** argv) {
  Case c;
  emu::for_each_arg(argc, argv, [&c](const std::string& key, const std::string& val) {
    if (key == "dtype") c.dtype = val;
    else if (key == "d") c.d = std::stoi(val);
    else if (key == "page") c.page = std::stoi(val);
    else if (key == "hq") c.hq = std::stoi(val);
    else if (key == "hkv") c.hkv = std::stoi(val);
    else if (key == "qlens") c.qlens = parse_list(val);
    else if (key == "seqs") c.seqs = parse_list(val);
    else if (key == "split") c.split = std::stoi(val);
    else if (key == "q_extra") c.q_extra = std::stoi(val);
    else if (key == "seed") c.seed = static_cast<unsigned>(std::stoul(val));
    else if (key == "mt") c.mt = val;
    else if (key == "cp_async") c.cp_async = val;
    else if (key == "fault") c.fault = val;
    else throw std::invalid_argument("unknown key: " + key);
  });
  const bool ok = (c.dtype == "bf16" || c.dtype == "fp16") && (c.d == 32 || c.d == 64 || c.d == 128) &&
                  c.page > 0 && c.hkv > 0 && c.hq % c.hkv == 0 && c.qlens.size() == c.seqs.size() &&
                  c.split % 64 == 0 && c.split >= 0 && c.q_extra % 8 == 0 && c.q_extra >= 0 &&
                  (c.mt == "auto" || c.mt == "1" || c.mt == "2") && (c.cp_async == "wait" || c.cp_async == "issue") &&
                  (c.fault == "none" || c.fault == "skip_first_wait");
  if (!ok) throw std::invalid_argument("invalid case");
  for (size_t b = 0; b < c.seqs.size(); ++b)
    if (c.qlens[b] < 0 || c.seqs[b] < c.qlens[b]) throw std::invalid_argument("need 0 <= q_len <= seq_len");
  return c;
}

// A vector with kGuard pattern elements on both sides; intact() tells whether they still hold.
template <typename E>
struct Guarded {
  static constexpr size_t kGuard = 64;
  Guarded(size_t n, E fill, E guard) : guard(guard), v(n + 2 * kGuard, fill) {
    std::fill(v.begin(), v.begin() + kGuard, guard);
    std::fill(v.end() - kGuard, v.end(), guard);
  }
  E* data() { return v.data() + kGuard; }
  E& operator[](size_t i) { return v[kGuard + i]; }
  bool intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (std::memcmp(&v[i], &guard, sizeof(E)) != 0 || std::memcmp(&v[v.size() - 1 - i], &guard, sizeof(E)) != 0)
        return false;
    return true;
  }
  E guard;
  std::vector<E> v;
};

// Buffers the kernel may read with cp.async: [begin, end).
std::vector<std::pair<const char*, const char*>> g_inputs;

constexpr uint16_t kNanBits = 0x7FFF;  // a NaN in both fp16 and bf16

template <typename T>
uint16_t to_bits(float f) {
  const T x = T(f);
  uint16_t b;
  std::memcpy(&b, &x, 2);
  return b;
}
template <typename T>
double to_double(uint16_t b) {
  return emu::b16_to_float<T>(b);
}

// The paged problem: inputs, page table and kernel parameters (outputs are allocated by run_case).
struct Problem {
  int ntok = 0, max_q = 0, max_seq = 0, max_pages = 0, num_pages = 0, num_splits = 1, split_len = 0;
  int64_t q_stride = 0;
  std::vector<int> qsl;          // [B + 1] query_start_loc
  std::vector<int> bt;           // [B][max_pages] block table
  std::vector<uint16_t> q;       // [ntok][q_stride]
  std::vector<uint16_t> kc, vc;  // [num_pages][page][hkv][d]
  float scale = 0.f;
};

int pages_for(int tokens, int page) { return (tokens + page - 1) / page; }

template <typename T>
Problem make_problem(const Case& c) {
  std::mt19937 rng(c.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int B = static_cast<int>(c.qlens.size());
  Problem pr;
  pr.qsl.assign(B + 1, 0);
  for (int b = 0; b < B; ++b) {
    pr.qsl[b + 1] = pr.qsl[b] + c.qlens[b];
    pr.max_q = std::max(pr.max_q, c.qlens[b]);
    pr.max_seq = std::max(pr.max_seq, c.seqs[b]);
    pr.max_pages = std::max(pr.max_pages, pages_for(c.seqs[b], c.page));
    pr.num_pages += pages_for(c.seqs[b], c.page);
  }
  pr.ntok = pr.qsl[B];
  pr.max_pages += 2;  // table entries past the pages in use: -1 and 2^30, never to be followed
  pr.num_pages += 3;  // unused pages (NaN)
  std::vector<int> perm(pr.num_pages);
  for (int i = 0; i < pr.num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  pr.bt.assign(static_cast<size_t>(B) * pr.max_pages, -1);
  const int64_t slot = static_cast<int64_t>(c.hkv) * c.d;  // elements of one cache slot
  pr.kc.assign(static_cast<size_t>(pr.num_pages) * c.page * slot, kNanBits);
  pr.vc.assign(pr.kc.size(), kNanBits);
  int next = 0;
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < pr.max_pages; ++i) {
      int& entry = pr.bt[static_cast<size_t>(b) * pr.max_pages + i];
      entry = i < pages_for(c.seqs[b], c.page) ? perm[next++] : (i % 2 ? -1 : 1 << 30);
    }
    for (int k = 0; k < c.seqs[b]; ++k) {  // real tokens only; the rest stays NaN
      const int64_t base = (static_cast<int64_t>(pr.bt[static_cast<size_t>(b) * pr.max_pages + k / c.page]) * c.page +
                            k % c.page) * slot;
      for (int64_t e = 0; e < slot; ++e) {
        pr.kc[base + e] = to_bits<T>(normal(rng));
        pr.vc[base + e] = to_bits<T>(normal(rng));
      }
    }
  }
  pr.q_stride = static_cast<int64_t>(c.hq) * c.d + c.q_extra;
  pr.q.resize(static_cast<size_t>(pr.ntok) * pr.q_stride);
  for (size_t t = 0; t < static_cast<size_t>(pr.ntok); ++t)
    for (int64_t e = 0; e < pr.q_stride; ++e)
      pr.q[t * pr.q_stride + e] = e < static_cast<int64_t>(c.hq) * c.d ? to_bits<T>(normal(rng)) : kNanBits;
  pr.scale = 1.3f / std::sqrt(static_cast<float>(c.d));  // a bit sharper than usual
  const int keys = std::max(pr.max_seq, 1);
  pr.num_splits = c.split > 0 ? (keys + c.split - 1) / c.split : 1;
  pr.split_len = c.split > 0 ? c.split : (keys + 63) / 64 * 64;
  return pr;
}

// Runs every CTA of the grid (hkv * row_tiles, num_seqs, num_splits), one after the other, each as
// kThreads host threads.
template <typename T, int D, int MT>
bool launch(const PagedAttentionParams& p) {
  using Cfg = tandem_rt::kernels::MmaConfig<T, D, MT>;
  const int row_tiles = (p.max_q_len * (p.hq / p.hkv) + Cfg::kRows - 1) / Cfg::kRows;
  bool ok = true;
  for (int z = 0; z < p.num_splits; ++z)
    for (int y = 0; y < p.num_seqs; ++y)
      for (int x = 0; x < p.hkv * row_tiles; ++x) {
        emu::Cta cta(Cfg::kSmemBytes);
        std::vector<std::thread> threads;
        for (int t = 0; t < emu::Cta::kThreads; ++t)
          threads.emplace_back([&, t] {
            emu::tls.tid = dim3(t, 0, 0);
            emu::tls.bid = dim3(x, y, z);
            emu::tls.cta = &cta;
            tandem_rt::kernels::paged_attention_mma_kernel<T, D, MT>(p);
            if (!emu::pending_copies.empty()) emu::trap("cp.async copies never waited for");
          });
        for (std::thread& th : threads) th.join();
        for (int i = 0; i < emu::Cta::kSmemGuard; ++i)
          if (cta.smem[Cfg::kSmemBytes + i] != 0xFF) ok = false;
      }
  if (!ok) std::printf("WRITE PAST THE SHARED MEMORY\n");
  return ok;
}

template <typename T, int D>
bool launch_mt(const PagedAttentionParams& p, int mt) {
  return mt == 1 ? launch<T, D, 1>(p) : launch<T, D, 2>(p);
}

template <typename T>
bool launch_typed(const PagedAttentionParams& p, int mt) {
  switch (p.head_dim) {
    case 32: return launch_mt<T, 32>(p, mt);
    case 64: return launch_mt<T, 64>(p, mt);
    default: return launch_mt<T, 128>(p, mt);
  }
}

// Causal attention of query token t of sequence b, head h, in float64: o[D].
template <typename T>
std::vector<double> reference_row(const Case& c, const Problem& pr, int b, int t, int h) {
  const int group = c.hq / c.hkv, kvh = h / group, pos = c.seqs[b] - c.qlens[b] + t;
  const uint16_t* q = pr.q.data() + static_cast<int64_t>(pr.qsl[b] + t) * pr.q_stride + static_cast<int64_t>(h) * c.d;
  auto slot = [&](int k) {  // element offset of key k's head kvh
    const int page = pr.bt[static_cast<size_t>(b) * pr.max_pages + k / c.page];
    return ((static_cast<int64_t>(page) * c.page + k % c.page) * c.hkv + kvh) * c.d;
  };
  std::vector<double> s(pos + 1);
  double m = -INFINITY;
  for (int k = 0; k <= pos; ++k) {
    double dot = 0;
    for (int e = 0; e < c.d; ++e) dot += to_double<T>(q[e]) * to_double<T>(pr.kc[slot(k) + e]);
    s[k] = dot * pr.scale;
    m = std::max(m, s[k]);
  }
  double l = 0;
  std::vector<double> o(c.d, 0.0);
  for (int k = 0; k <= pos; ++k) {
    const double w = std::exp(s[k] - m);
    l += w;
    for (int e = 0; e < c.d; ++e) o[e] += w * to_double<T>(pr.vc[slot(k) + e]);
  }
  for (double& x : o) x /= l;
  return o;
}

// Output row `row` (= token * hq + head) from the split partials, merged in float64.
std::vector<double> merge_splits(const PagedAttentionParams& p, int64_t row) {
  const int64_t split_stride = static_cast<int64_t>(p.ntok) * p.hq;
  double m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) m = std::max(m, static_cast<double>(p.part_ml[(s * split_stride + row) * 2]));
  double l = 0;
  std::vector<double> o(p.head_dim, 0.0);
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t prow = s * split_stride + row;
    const double ms = p.part_ml[prow * 2];
    const double w = ms == -INFINITY ? 0.0 : std::exp2(ms - m);  // max in log2 units
    l += w * p.part_ml[prow * 2 + 1];
    for (int e = 0; e < p.head_dim; ++e) o[e] += w * p.part_out[prow * p.head_dim + e];
  }
  for (double& x : o) x /= l;
  return o;
}

template <typename T>
int run_case(const Case& c) {
  const Problem pr = make_problem<T>(c);
  const int64_t out_elems = static_cast<int64_t>(pr.ntok) * c.hq * c.d;
  Guarded<uint16_t> out(out_elems, 0x7777, 0x5A5A);
  const bool split = pr.num_splits > 1;
  Guarded<float> part_out(split ? pr.num_splits * out_elems : 0, NAN, -1234.5f);
  Guarded<float> part_ml(split ? pr.num_splits * pr.ntok * c.hq * 2 : 0, NAN, -1234.5f);
  auto bytes = [](const std::vector<uint16_t>& v) {
    const char* b = reinterpret_cast<const char*>(v.data());
    return std::make_pair(b, b + v.size() * sizeof(uint16_t));
  };
  g_inputs = {bytes(pr.q), bytes(pr.kc), bytes(pr.vc)};
  std::vector<int> seqs = c.seqs, qsl = pr.qsl, bt = pr.bt;
  PagedAttentionParams p{};
  p.out = out.data();
  p.q = pr.q.data();
  p.k_cache = pr.kc.data();
  p.v_cache = pr.vc.data();
  p.block_tables = bt.data();
  p.seq_lens = seqs.data();
  p.query_start_loc = qsl.data();
  p.part_out = split ? part_out.data() : nullptr;
  p.part_ml = split ? part_ml.data() : nullptr;
  p.q_stride = pr.q_stride;
  p.num_seqs = static_cast<int>(c.qlens.size());
  p.ntok = pr.ntok;
  p.hq = c.hq;
  p.hkv = c.hkv;
  p.head_dim = c.d;
  p.page_size = c.page;
  p.max_pages = pr.max_pages;
  p.num_pages = pr.num_pages;
  p.max_q_len = pr.max_q;
  p.num_splits = pr.num_splits;
  p.split_len = pr.split_len;
  p.scale = pr.scale;
  const int group = c.hq / c.hkv;
  const int mt = c.mt == "auto" ? (pr.max_q * group <= 16 ? 1 : 2) : std::stoi(c.mt);
  emu::cp_async_defer = c.cp_async == "wait";
  emu::skip_first_wait = c.fault == "skip_first_wait";

  bool ok = pr.max_q == 0 || launch_typed<T>(p, mt);  // the launcher returns early without queries
  if (!out.intact() || !part_out.intact() || !part_ml.intact()) {
    std::printf("WRITE OUTSIDE AN OUTPUT BUFFER\n");
    ok = false;
  }
  double max_err = 0;
  int bad = 0;
  for (size_t b = 0; b < c.qlens.size(); ++b)
    for (int t = 0; t < c.qlens[b]; ++t)
      for (int h = 0; h < c.hq; ++h) {
        const int64_t row = static_cast<int64_t>(pr.qsl[b] + t) * c.hq + h;
        const std::vector<double> ref = reference_row<T>(c, pr, static_cast<int>(b), t, h);
        const std::vector<double> got = split ? merge_splits(p, row) : std::vector<double>();
        for (int e = 0; e < c.d; ++e) {
          const double g = split ? got[e] : to_double<T>(out[row * c.d + e]);
          const double err = std::fabs(g - ref[e]);
          if (!(err <= 3e-2)) {  // also NaN
            if (bad++ < 5)
              std::printf("  mismatch seq %zu token %d head %d dim %d: ref %.5f got %.5f\n", b, t, h, e, ref[e], g);
            max_err = INFINITY;
          }
          max_err = std::max(max_err, err);
        }
      }
  if (split)  // rows with no query are never written: `out` must be untouched
    for (int64_t i = 0; i < out_elems; ++i)
      if (out[i] != 0x7777) {
        std::printf("SPLIT RUN WROTE `out`\n");
        ok = false;
        break;
      }
  std::printf("%s d=%d page=%d hq=%d hkv=%d seqs=%zu max_q=%d max_seq=%d splits=%d mt=%d cp_async=%s: "
              "max_err=%.3g bad=%d\n",
              c.dtype.c_str(), c.d, c.page, c.hq, c.hkv, c.qlens.size(), pr.max_q, pr.max_seq, pr.num_splits, mt,
              c.cp_async.c_str(), max_err, bad);
  return ok && bad == 0 ? 0 : 1;
}

}  // namespace

bool emu::global_ok(const void* p, size_t bytes) {
  const char* b = static_cast<const char*>(p);
  for (const auto& [begin, end] : g_inputs)
    if (b >= begin && b + bytes <= end) return true;
  return false;
}

int main(int argc, char** argv) {
  alarm(120);  // a deadlocked barrier ends the run (SIGALRM)
  try {
    const Case c = parse_case(argc, argv);
    return c.dtype == "fp16" ? run_case<__half>(c) : run_case<__nv_bfloat16>(c);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mma_emulator: %s\n", e.what());
    return 2;
  }
}
