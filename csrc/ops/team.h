// A team of threads that runs a whole decoder step in one OpenMP parallel region
// (ops/decoder_plan.cpp), and the parallel loop every CPU op of a step uses.
//
// Outside a team, team::parallel_for is at::parallel_for: each op forks the threads and joins
// them, ~9 times per layer. Inside a team every thread calls every op of the step itself, and the
// op's loop runs as the calling thread's mode says:
//   * kSplit: thread `index` of `size` runs its share of the range (the shares of a range tile it,
//     split as at::parallel_for splits it between `size` threads); the caller puts a barrier after
//     the op before anything reads the op's output;
//   * kWhole: the calling thread runs the whole range (an op whose output is private to the thread,
//     e.g. every thread normalising the residual into its own buffer).
// An op's results do not depend on how its range is split (each output element is computed by one
// thread, in one order), so a team step is bit-identical to the same ops run one by one.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace tandem_rt {
namespace team {

enum class Mode : int { kOff = 0, kSplit = 1, kWhole = 2 };

struct Slice {
  Mode mode = Mode::kOff;
  int index = 0;  // this thread's rank in the team, 0 <= index < size
  int size = 1;   // threads in the team
};

inline Slice& current() {
  static thread_local Slice slice;
  return slice;
}

// Sets the calling thread's mode for a scope and restores the previous one.
class Scope {
 public:
  Scope(Mode mode, int index, int size) : saved_(current()) { current() = Slice{mode, index, size}; }
  explicit Scope(Mode mode) : Scope(mode, current().index, current().size) {}
  ~Scope() { current() = saved_; }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Slice saved_;
};

// The share [b, e) of [begin, end) that thread `index` of `size` runs: as at::parallel_for, at
// most ceil((end - begin) / grain) shares of ceil(range / shares) elements (the last ones may be
// empty).
inline void share(int64_t begin, int64_t end, int64_t grain, int index, int size, int64_t& b, int64_t& e) {
  const int64_t range = end - begin;
  const int64_t g = std::max<int64_t>(grain, 1);
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(size, (range + g - 1) / g));
  const int64_t chunk = (range + shares - 1) / shares;
  b = std::min(end, begin + index * chunk);
  e = std::min(end, b + chunk);
}

// f(b, e) over [begin, end): at::parallel_for outside a team; in a team, this thread's share
// (kSplit) or the whole range (kWhole).
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const Slice& s = current();
  if (s.mode == Mode::kOff) return at::parallel_for(begin, end, grain, f);
  if (begin >= end) return;
  if (s.mode == Mode::kWhole) return f(begin, end);
  int64_t b, e;
  share(begin, end, grain, s.index, s.size, b, e);
  if (b < e) f(b, e);
}

// Threads an op's work is split between: the team's size in a team (1 for kWhole), else torch's.
inline int64_t num_threads() {
  const Slice& s = current();
  if (s.mode == Mode::kOff) return at::get_num_threads();
  return s.mode == Mode::kWhole ? 1 : s.size;
}

}  // namespace team
}  // namespace tandem_rt
