// tandem_rt._C.cpu.DecoderPlan: the decoder layers of a CPU decode / draft / verify step in one call.
//
// A step of PagedLlama.forward calls ~8 ops per layer (RMSNorm, QKV product, RoPE + cache write,
// paged attention, O product + residual, RMSNorm, gate/up product, SiLU * up, down product +
// residual). Driven from Python, each call pays the interpreter, argument conversion, the
// splitting of QKV into views and an output allocation; 30 layers of it are a visible share of a
// small model's decode step (tools/bench_forward.py --breakdown). The plan is built once per model
// (the weights of every layer, each product's kernel) and runs every layer of a step in C++,
// calling the same direct entry points (ops/direct.h) in the same order with the same arguments,
// so its results are bit-identical to the Python loop.
//
// With more than one thread (at::get_num_threads()) and `team` set, the whole step runs in one
// OpenMP parallel region (ops/team.h) instead of forking and joining the threads in each of the
// ~9 ops of a layer: every thread normalises the residual and applies SiLU * up into buffers of its
// own, the products split their outputs, RoPE + cache write its rows, attention its (sequence, KV
// head) items between the threads, with a barrier wherever a thread reads what another one wrote
// (6 per layer). The same kernels compute every output element, so the results stay bit-identical.
#include "ops/direct.h"
#include "common/check.h"
#include "ops/team.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tandem_rt {
namespace {

// How one weight matrix is multiplied: kDense = linear_rows on a bf16 / fp32 [out, in] matrix,
// kQ16 = linear_rows_q16 on the 16-output packed blocks, kQBlocks = linear_rows_q on GGUF block rows.
enum class Kernel : int64_t { kDense = 0, kQ16 = 1, kQBlocks = 2 };

struct Product {
  at::Tensor w;         // [out, in] dense, or the packed / block-row uint8 layout of a quantized matrix
  Kernel kernel;
  int64_t qtype;        // linear_rows_q[16] qtype code (quantized kernels only)

  at::Tensor operator()(const at::Tensor& x, const std::optional<at::Tensor>& add) const {
    switch (kernel) {
      case Kernel::kQ16: return direct::linear_rows_q16(x, w, qtype, add);
      case Kernel::kQBlocks: return direct::linear_rows_q(x, w, qtype, add);
      default: return direct::linear_rows(x, w, add);
    }
  }

  // The same product into y [rows of x, out_features()].
  void into(at::Tensor& y, const at::Tensor& x, const std::optional<at::Tensor>& add) const {
    switch (kernel) {
      case Kernel::kQ16: return direct::linear_rows_q16_out(y, x, w, qtype, add);
      case Kernel::kQBlocks: return direct::linear_rows_q_out(y, x, w, qtype, add);
      default: return direct::linear_rows_out(y, x, w, add);
    }
  }

  int64_t out_features() const { return kernel == Kernel::kQ16 ? w.size(0) * 16 : w.size(0); }
};

struct Layer {
  at::Tensor ln1;                     // [d]
  Product qkv;                        // [q_size + 2 kv_size, d]
  std::optional<at::Tensor> b_qkv;    // [q_size + 2 kv_size] or none
  Product o;                          // [d, q_size]
  at::Tensor ln2;                     // [d]
  Product gate_up;                    // [2 I, d]
  Product down;                       // [d, I]
};

Product product_of(const pybind11::tuple& t, const char* what, int64_t layer) {
  TORCH_CHECK_VALUE(t.size() == 3, "DecoderPlan: layer ", layer, " ", what, " must be (weight, kernel, qtype)");
  const auto kernel = t[1].cast<int64_t>();
  TORCH_CHECK_VALUE(kernel >= 0 && kernel <= 2, "DecoderPlan: layer ", layer, " ", what,
                    " kernel must be 0 (dense), 1 (q16) or 2 (block rows), got ", kernel);
  return Product{t[0].cast<at::Tensor>(), static_cast<Kernel>(kernel), t[2].cast<int64_t>()};
}

class DecoderPlan {
 public:
  // layers: per layer (ln1, qkv, b_qkv or None, o, ln2, gate_up, down), each product a tuple
  // (weight, kernel, qtype). team: run a step on several threads as one team (see the top of the
  // file) rather than op by op.
  DecoderPlan(const std::vector<pybind11::tuple>& layers, int64_t num_heads, int64_t num_kv_heads,
              int64_t head_dim, double eps, double rope_theta, double scale, bool team)
      : hq_(num_heads), hkv_(num_kv_heads), d_(head_dim), eps_(eps), theta_(rope_theta), scale_(scale), team_(team) {
    TORCH_CHECK_VALUE(hq_ > 0 && hkv_ > 0 && d_ > 0 && hq_ % hkv_ == 0,
                      "DecoderPlan: bad head counts (num_heads ", hq_, ", num_kv_heads ", hkv_, ", head_dim ", d_, ")");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      const auto li = static_cast<int64_t>(i);
      TORCH_CHECK_VALUE(t.size() == 7, "DecoderPlan: layer ", li, " must have 7 entries, got ", t.size());
      Layer l{t[0].cast<at::Tensor>(), product_of(t[1].cast<pybind11::tuple>(), "qkv", li),
              t[2].is_none() ? std::nullopt : std::optional<at::Tensor>(t[2].cast<at::Tensor>()),
              product_of(t[3].cast<pybind11::tuple>(), "o", li), t[4].cast<at::Tensor>(),
              product_of(t[5].cast<pybind11::tuple>(), "gate_up", li),
              product_of(t[6].cast<pybind11::tuple>(), "down", li)};
      layers_.push_back(std::move(l));
    }
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  bool team() const { return team_; }

  // Runs every layer over the rows of one step.
  //   x:               [T, d] the layer-0 input (embeddings, plus any input offset); not modified
  //   positions:       int64 [T]; slot_mapping: int64 [T] (-1 = no write)
  //   block_tables:    int32 [B, max_pages]; seq_lens: int32 [B]; query_start_loc: int32 [B + 1]
  //   k_cache/v_cache: per layer [num_pages, page_size, num_kv_heads, head_dim]
  //   hidden_layers:   residual streams to return (1..L: a layer's output; 0 is the caller's x)
  // Returns [x after the last layer, then the requested streams in hidden_layers' order].
  std::vector<at::Tensor> run(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& slot_mapping,
                              const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, int64_t max_q_len, int64_t max_seq_len,
                              const std::vector<at::Tensor>& k_cache, const std::vector<at::Tensor>& v_cache,
                              const std::vector<int64_t>& hidden_layers) const {
    const auto L = num_layers();
    TORCH_CHECK_VALUE(static_cast<int64_t>(k_cache.size()) == L && static_cast<int64_t>(v_cache.size()) == L,
                      "DecoderPlan.run: k_cache and v_cache need one pool per layer (", L, "), got ",
                      k_cache.size(), " and ", v_cache.size());
    check_rank(x_in, "x", 2);
    std::vector<bool> wanted(L + 1, false);   // streams to keep (the others are freed as the step goes)
    for (auto h : hidden_layers) {
      TORCH_CHECK_VALUE(h >= 0 && h <= L, "DecoderPlan.run: hidden_layers entries must be in 0..", L, ", got ", h);
      wanted[h] = true;
    }
    const int64_t T = x_in.size(0);
#ifdef _OPENMP
    const int threads = team_ ? at::get_num_threads() : 1;
    if (threads > 1 && T > 0 && L > 0)
      return run_team(threads, wanted, x_in, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
                      max_q_len, max_seq_len, k_cache, v_cache, hidden_layers);
#endif
    const int64_t qs = hq_ * d_;
    std::vector<at::Tensor> saved(L + 1);
    at::Tensor x = x_in;
    if (wanted[0]) saved[0] = x;
    at::Tensor attn = at::empty({T, hq_, d_}, x.options());   // one output buffer for every layer
    const std::optional<at::Tensor> pa_scratch = attention_scratch(T, seq_lens.size(0), max_seq_len);
    for (int64_t i = 0; i < L; ++i) {
      const Layer& l = layers_[i];
      at::Tensor qkv = l.qkv(direct::rms_norm(x, l.ln1, eps_), l.b_qkv).view({T, hq_ + 2 * hkv_, d_});
      at::Tensor q = qkv.narrow(1, 0, hq_);
      at::Tensor k = qkv.narrow(1, hq_, hkv_);
      at::Tensor v = qkv.narrow(1, hq_ + hkv_, hkv_);
      direct::rope_cache_write(k, v, positions, slot_mapping, k_cache[i], v_cache[i], theta_, q);
      direct::paged_attention(attn, q, k_cache[i], v_cache[i], block_tables, seq_lens, query_start_loc, scale_,
                              max_q_len, max_seq_len, /*row_invariant=*/true, pa_scratch);
      x = l.o(attn.view({T, qs}), x);                                      // residual + o_proj
      at::Tensor gu = l.gate_up(direct::rms_norm(x, l.ln2, eps_), std::nullopt);
      x = l.down(direct::silu_and_mul(gu), x);                             // residual + down_proj
      if (wanted[i + 1]) saved[i + 1] = x;
    }
    std::vector<at::Tensor> out{x};
    for (auto h : hidden_layers) out.push_back(saved[h]);
    return out;
  }

 private:
  // Scratch for paged attention's key segments when a sequence may have more than one (fp32, the
  // completion counts at its tail zero), shared by every layer of a step and a team's threads.
  std::optional<at::Tensor> attention_scratch(int64_t T, int64_t nseq, int64_t max_seq_len) const {
    if (max_seq_len <= direct::kAttentionSegmentKeys) return std::nullopt;
    const int64_t n = direct::paged_attention_scratch_floats(T, nseq, hq_, d_, max_seq_len);
    at::Tensor s = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    s.narrow(0, n - nseq * hq_, nseq * hq_).zero_();
    return s;
  }

#ifdef _OPENMP
  // run() on a team of `threads` threads: one parallel region for the whole step.
  std::vector<at::Tensor> run_team(int threads, const std::vector<bool>& wanted, const at::Tensor& x_in,
                                   const at::Tensor& positions, const at::Tensor& slot_mapping,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& query_start_loc, int64_t max_q_len, int64_t max_seq_len,
                                   const std::vector<at::Tensor>& k_cache, const std::vector<at::Tensor>& v_cache,
                                   const std::vector<int64_t>& hidden_layers) const {
    const auto L = num_layers();
    const int64_t T = x_in.size(0), dm = x_in.size(1), qs = hq_ * d_;
    const auto opts = x_in.options();
    int64_t n_gu = 0;  // the widest gate/up product (every Llama layer has the same)
    for (const auto& l : layers_) n_gu = std::max(n_gu, l.gate_up.out_features());
    // buffers, allocated once per step: shared between the threads ...
    at::Tensor qkv = at::empty({T, hq_ + 2 * hkv_, d_}, opts);   // [T, Hq + 2 Hkv, D]
    at::Tensor q = qkv.narrow(1, 0, hq_), k = qkv.narrow(1, hq_, hkv_), v = qkv.narrow(1, hq_ + hkv_, hkv_);
    at::Tensor qkv2 = qkv.view({T, (hq_ + 2 * hkv_) * d_});
    at::Tensor attn = at::empty({T, hq_, d_}, opts);              // [T, Hq, D]
    at::Tensor attn2 = attn.view({T, qs});
    const std::optional<at::Tensor> pa_scratch = attention_scratch(T, seq_lens.size(0), max_seq_len);  // shared
    at::Tensor mid = at::empty({T, dm}, opts);                    // [T, d] the residual after attention
    at::Tensor gu_flat = at::empty({T * n_gu}, opts);             // [T, 2 I] gate/up outputs
    // ... and private to each thread: the normalised residual [T, d] and SiLU(gate) * up [T, I]
    std::vector<at::Tensor> xn(threads), act_flat(threads);
    for (int t = 0; t < threads; ++t) {
      xn[t] = at::empty({T, dm}, opts);
      act_flat[t] = at::empty({T * (n_gu / 2)}, opts);
    }
    // the residual stream after layer i: its own tensor where returned, else two alternating buffers
    std::vector<at::Tensor> xs(L + 1);
    xs[0] = x_in;
    at::Tensor alt[2] = {at::empty({T, dm}, opts), at::empty({T, dm}, opts)};
    for (int64_t i = 1; i <= L; ++i) xs[i] = wanted[i] ? at::empty({T, dm}, opts) : alt[i % 2];

    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex error_mutex;
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), size = omp_get_num_threads();
      team::Scope split(team::Mode::kSplit, tid, size);
      // Runs one phase of the step on this thread; a phase that throws records the first error
      // and the threads stop after the next barrier (every thread passes every barrier).
      auto phase = [&](auto&& f) {
        if (failed.load(std::memory_order_relaxed)) return;
        try {
          f();
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error) error = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      };
      at::Tensor& my_xn = xn[tid];
      for (int64_t i = 0; i < L && !failed.load(std::memory_order_relaxed); ++i) {
        const Layer& l = layers_[i];
        const at::Tensor& xi = xs[i];
        at::Tensor& xo = xs[i + 1];
        const int64_t ngu = l.gate_up.out_features();
        at::Tensor gu = gu_flat.narrow(0, 0, T * ngu).view({T, ngu});
        at::Tensor act = act_flat[tid].narrow(0, 0, T * (ngu / 2)).view({T, ngu / 2});
        phase([&] {
          {
            team::Scope whole(team::Mode::kWhole);
            direct::rms_norm_out(my_xn, xi, l.ln1, eps_);
          }
          l.qkv.into(qkv2, my_xn, l.b_qkv);
        });
#pragma omp barrier
        phase([&] { direct::rope_cache_write(k, v, positions, slot_mapping, k_cache[i], v_cache[i], theta_, q); });
#pragma omp barrier
        phase([&] {
          direct::paged_attention(attn, q, k_cache[i], v_cache[i], block_tables, seq_lens, query_start_loc, scale_,
                                  max_q_len, max_seq_len, /*row_invariant=*/true, pa_scratch);
        });
#pragma omp barrier
        phase([&] { l.o.into(mid, attn2, xi); });                    // residual + o_proj
#pragma omp barrier
        phase([&] {
          {
            team::Scope whole(team::Mode::kWhole);
            direct::rms_norm_out(my_xn, mid, l.ln2, eps_);
          }
          l.gate_up.into(gu, my_xn, std::nullopt);
        });
#pragma omp barrier
        phase([&] {
          {
            team::Scope whole(team::Mode::kWhole);
            direct::silu_and_mul_out(act, gu);
          }
          l.down.into(xo, act, mid);                                  // residual + down_proj
        });
#pragma omp barrier
      }
    }
    if (error) std::rethrow_exception(error);
    std::vector<at::Tensor> out{xs[L]};
    for (auto h : hidden_layers) out.push_back(xs[h]);
    return out;
  }
#endif

  std::vector<Layer> layers_;
  int64_t hq_, hkv_, d_;
  double eps_, theta_, scale_;
  bool team_;
};

}  // namespace

void bind_decoder_plan(pybind11::module_& cpu) {
  using pybind11::arg;
  pybind11::class_<DecoderPlan>(cpu, "DecoderPlan",
                                "The decoder layers of a CPU step in one call (ops/decoder_plan.cpp): built once "
                                "per model from its layers' weights, run per step; bit-identical to calling the "
                                "direct ops layer by layer.")
      .def(pybind11::init<const std::vector<pybind11::tuple>&, int64_t, int64_t, int64_t, double, double, double,
                          bool>(),
           arg("layers"), arg("num_heads"), arg("num_kv_heads"), arg("head_dim"), arg("eps"), arg("rope_theta"),
           arg("scale"), arg("team") = true)
      .def_property_readonly("num_layers", &DecoderPlan::num_layers)
      .def_property_readonly("team", &DecoderPlan::team)
      .def("run", &DecoderPlan::run, arg("x"), arg("positions"), arg("slot_mapping"), arg("block_tables"),
           arg("seq_lens"), arg("query_start_loc"), arg("max_q_len"), arg("max_seq_len"), arg("k_cache"),
           arg("v_cache"), arg("hidden_layers"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace tandem_rt
