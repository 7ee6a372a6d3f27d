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
#include "ops/direct.h"
#include "common/check.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <utility>
#include <vector>

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
  // (weight, kernel, qtype).
  DecoderPlan(const std::vector<pybind11::tuple>& layers, int64_t num_heads, int64_t num_kv_heads,
              int64_t head_dim, double eps, double rope_theta, double scale)
      : hq_(num_heads), hkv_(num_kv_heads), d_(head_dim), eps_(eps), theta_(rope_theta), scale_(scale) {
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
    const int64_t qs = hq_ * d_;
    std::vector<at::Tensor> saved(L + 1);
    at::Tensor x = x_in;
    if (wanted[0]) saved[0] = x;
    at::Tensor attn = at::empty({T, hq_, d_}, x.options());   // one output buffer for every layer
    for (int64_t i = 0; i < L; ++i) {
      const Layer& l = layers_[i];
      at::Tensor qkv = l.qkv(direct::rms_norm(x, l.ln1, eps_), l.b_qkv).view({T, hq_ + 2 * hkv_, d_});
      at::Tensor q = qkv.narrow(1, 0, hq_);
      at::Tensor k = qkv.narrow(1, hq_, hkv_);
      at::Tensor v = qkv.narrow(1, hq_ + hkv_, hkv_);
      direct::rope_cache_write(k, v, positions, slot_mapping, k_cache[i], v_cache[i], theta_, q);
      direct::paged_attention(attn, q, k_cache[i], v_cache[i], block_tables, seq_lens, query_start_loc, scale_,
                              max_q_len, max_seq_len, /*row_invariant=*/true);
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
  std::vector<Layer> layers_;
  int64_t hq_, hkv_, d_;
  double eps_, theta_, scale_;
};

}  // namespace

void bind_decoder_plan(pybind11::module_& cpu) {
  using pybind11::arg;
  pybind11::class_<DecoderPlan>(cpu, "DecoderPlan",
                                "The decoder layers of a CPU step in one call (ops/decoder_plan.cpp): built once "
                                "per model from its layers' weights, run per step; bit-identical to calling the "
                                "direct ops layer by layer.")
      .def(pybind11::init<const std::vector<pybind11::tuple>&, int64_t, int64_t, int64_t, double, double, double>(),
           arg("layers"), arg("num_heads"), arg("num_kv_heads"), arg("head_dim"), arg("eps"), arg("rope_theta"),
           arg("scale"))
      .def_property_readonly("num_layers", &DecoderPlan::num_layers)
      .def("run", &DecoderPlan::run, arg("x"), arg("positions"), arg("slot_mapping"), arg("block_tables"),
           arg("seq_lens"), arg("query_start_loc"), arg("max_q_len"), arg("max_seq_len"), arg("k_cache"),
           arg("v_cache"), arg("hidden_layers"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace tandem_rt
