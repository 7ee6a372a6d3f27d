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

  // y [rows of x, out_features()] = add + x @ w^T by the product's kernel.
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
      TORCH_CHECK_VALUE(layers_.empty() || l.gate_up.out_features() == layers_[0].gate_up.out_features(),
                        "DecoderPlan: layer ", li, " has ", l.gate_up.out_features(), " gate/up outputs, layer 0 ",
                        layers_[0].gate_up.out_features());
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
    const int64_t T = x_in.size(0), dm = x_in.size(1);
    int threads = 1;
#ifdef _OPENMP
    if (team_ && T > 0 && L > 0) threads = at::get_num_threads();
#endif
    const auto opts = x_in.options();
    const int64_t n_gu = L > 0 ? layers_[0].gate_up.out_features() : 0;   // every layer's (checked)
    Buffers buf;   // allocated once per step; shared between a team's threads, except xn / act
    buf.qkv = at::empty({T, hq_ + 2 * hkv_, d_}, opts);
    buf.attn = at::empty({T, hq_, d_}, opts);
    buf.mid = at::empty({T, dm}, opts);
    buf.gu = at::empty({T, n_gu}, opts);
    for (int t = 0; t < threads; ++t) {
      buf.xn.push_back(at::empty({T, dm}, opts));
      buf.act.push_back(at::empty({T, n_gu / 2}, opts));
    }
    buf.pa_scratch = direct::paged_attention_scratch(T, seq_lens.size(0), hq_, d_, max_seq_len);
    // the residual stream after layer i: its own tensor where returned, else two alternating buffers
    buf.xs.resize(L + 1);
    buf.xs[0] = x_in;
    at::Tensor alt[2] = {at::empty({T, dm}, opts), at::empty({T, dm}, opts)};
    for (int64_t i = 1; i <= L; ++i) buf.xs[i] = wanted[i] ? at::empty({T, dm}, opts) : alt[i % 2];
    const StepArgs args{positions, slot_mapping, block_tables, seq_lens, query_start_loc, max_q_len, max_seq_len,
                        k_cache, v_cache};
    Errors err;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
      {
        team::Scope split(team::Mode::kSplit, omp_get_thread_num(), omp_get_num_threads());
        run_layers(args, buf, omp_get_thread_num(), /*in_team=*/true, err);
      }
    } else
#endif
      run_layers(args, buf, 0, /*in_team=*/false, err);
    if (err.error) std::rethrow_exception(err.error);
    std::vector<at::Tensor> out{buf.xs[L]};
    for (auto h : hidden_layers) out.push_back(buf.xs[h]);
    return out;
  }

 private:
  struct StepArgs {   // run()'s per-step arguments, as documented there
    const at::Tensor &positions, &slot_mapping, &block_tables, &seq_lens, &query_start_loc;
    int64_t max_q_len, max_seq_len;
    const std::vector<at::Tensor>&k_cache, &v_cache;
  };
  struct Buffers {
    at::Tensor qkv;                     // [T, Hq + 2 Hkv, D]
    at::Tensor attn;                    // [T, Hq, D]
    at::Tensor mid;                     // [T, d] the residual after attention
    at::Tensor gu;                      // [T, 2 I] gate/up outputs
    std::vector<at::Tensor> xn, act;    // per thread: the normalised residual [T, d], SiLU(gate) * up [T, I]
    std::vector<at::Tensor> xs;         // [L + 1] the residual stream after each layer (0: the input)
    std::optional<at::Tensor> pa_scratch;   // paged attention's key-segment scratch, or none
  };
  struct Errors {   // the first error a thread met; the threads stop after the next barrier
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex mutex;
  };

  // Every layer of a step on thread `tid`: alone (in_team false: each op's loop forks the threads
  // itself), or as one of a team (each op runs this thread's share; the barriers wait for the
  // others wherever a thread reads what another one wrote; outside a parallel region they are
  // no-ops). A phase that throws records its error, and every thread still passes every barrier.
  void run_layers(const StepArgs& a, Buffers& buf, int tid, bool in_team, Errors& err) const {
    auto phase = [&](auto&& f) {
      if (err.failed.load(std::memory_order_relaxed)) return;
      try {
        f();
      } catch (...) {
        std::lock_guard<std::mutex> lock(err.mutex);
        if (!err.error) err.error = std::current_exception();
        err.failed.store(true, std::memory_order_relaxed);
      }
    };
    auto own = [&](auto&& f) {   // an op into this thread's own buffer: its whole range here
      if (!in_team) return f();
      team::Scope whole(team::Mode::kWhole);
      f();
    };
    const int64_t T = buf.qkv.size(0);
    at::Tensor q = buf.qkv.narrow(1, 0, hq_), k = buf.qkv.narrow(1, hq_, hkv_), v = buf.qkv.narrow(1, hq_ + hkv_, hkv_);
    at::Tensor qkv2 = buf.qkv.view({T, (hq_ + 2 * hkv_) * d_}), attn2 = buf.attn.view({T, hq_ * d_});
    at::Tensor &xn = buf.xn[tid], &act = buf.act[tid];
    for (int64_t i = 0; i < num_layers() && !err.failed.load(std::memory_order_relaxed); ++i) {
      const Layer& l = layers_[i];
      const at::Tensor& xi = buf.xs[i];
      phase([&] {
        own([&] { direct::rms_norm_out(xn, xi, l.ln1, eps_); });
        l.qkv.into(qkv2, xn, l.b_qkv);
      });
#pragma omp barrier
      phase([&] { direct::rope_cache_write(k, v, a.positions, a.slot_mapping, a.k_cache[i], a.v_cache[i], theta_, q); });
#pragma omp barrier
      phase([&] {
        direct::paged_attention(buf.attn, q, a.k_cache[i], a.v_cache[i], a.block_tables, a.seq_lens,
                                a.query_start_loc, scale_, a.max_q_len, a.max_seq_len, /*row_invariant=*/true,
                                buf.pa_scratch);
      });
#pragma omp barrier
      phase([&] { l.o.into(buf.mid, attn2, xi); });                                   // residual + o_proj
#pragma omp barrier
      phase([&] {
        own([&] { direct::rms_norm_out(xn, buf.mid, l.ln2, eps_); });
        l.gate_up.into(buf.gu, xn, std::nullopt);
      });
#pragma omp barrier
      phase([&] {
        own([&] { direct::silu_and_mul_out(act, buf.gu); });
        l.down.into(buf.xs[i + 1], act, buf.mid);                                     // residual + down_proj
      });
#pragma omp barrier
    }
  }

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
