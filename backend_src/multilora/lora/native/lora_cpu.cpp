// The fused CPU LoRA op: for every target i of one projection and every token t with an adapter,
//   y[t, start_i : start_i + h_out_i] += (x[t] @ A_i[slot t]) @ B_i[slot t]
// with A^T [h_in, r] and B^T [r, h_out] (scale folded in) read where the adapter slots put them.
//
// The step plan (lora/backends/cpu.py, CpuStep) lists the tokens with an adapter grouped by slot
// and cut into work items (slot, tokens). An item reads its adapter's A and B of every target once
// for all of its tokens; x rows are read once per item and stay in L1 across the targets (q/k/v,
// gate/up). Items go to torch's intra-op threads (at::parallel_for, so the same OpenMP pool as
// every other op), each thread taking the next item from a shared counter: decode items (a few
// tokens, bandwidth-bound) and prefill items (many tokens, compute-bound) balance without a cost
// model. A call whose other threads started late (their cores were busy) makes the next calls run
// on the calling thread alone for a while (Backoff).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace {

#define LORA_INLINE inline __attribute__((always_inline))

// Explicit vectors (GCC vector extensions): 16 floats are one AVX-512 register, 8 one AVX2 one, 4
// one SSE one. GCC's own vectorizer turned these tiles into gathers and scalar code. The last
// columns of odd ranks and widths go through the same tiles with narrower vectors, down to float.
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));

template <typename V>
struct Narrower { using type = float; };
template <>
struct Narrower<vec16> { using type = vec8; };
template <>
struct Narrower<vec8> { using type = vec4; };

template <typename V>
constexpr int64_t kLanes = sizeof(V) / sizeof(float);

template <typename V>
LORA_INLINE V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
LORA_INLINE void store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof v);
}

// ISA levels. One build runs on any x86-64: the item loop is compiled once per level (the target
// attributes on the entry points below) and the level is chosen per call, by the backend, from the
// ones this CPU has (isa_levels; MULTILORA_CPU_ISA forces one, lora/native/__init__.py). A level
// is the features its code uses, not a CPU model ("arch=skylake-avx512" would skip an AMD EPYC)
// nor a full x86-64-vN feature list (a VM that hides one unused feature, e.g. MOVBE, would fall
// back to SSE):
//   v4: AVX-512F + FMA, 32 registers of 16 floats; v3: AVX2 + FMA, 16 registers of 8 floats;
//   baseline: SSE2, 16 registers of 4 floats, no FMA.
enum Level : int { kBaseline = 0, kV3 = 1, kV4 = 2 };
constexpr const char* kLevelNames[] = {"baseline", "v3", "v4"};

// Register tiles per level (the few-row matmul's at its end): a tile of R rows x C vectors holds R*C accumulators, C vectors of
// weights and one broadcast; it must fit the register file or GCC spills it to the stack in the
// inner loop (AVX2's 16 registers hold 6 x 2, the BLIS Haswell shape; AVX-512's 32 hold 8 x 3).
//   kRows: token rows per tile (prefill); kCols: vectors per row of a tile; kGemvCols: vectors of a
//   one-row tile (decode: one token per distinct adapter), whose k loop is split over independent
//   accumulators instead (kChains in all), so the FMAs do not wait for each other. kPackedRows x
//   kPackedCols: the tiles of the few-row matmul (below).
// A decode step is bandwidth-bound: its tiles read A row after row and B's rows a few cache lines
// at a time, which the hardware prefetchers follow; software prefetch (tried 512 B and 1 KiB ahead)
// and reading B in blocks of 4 rows measured slower (docs/design.md, "The fused CPU LoRA op").
template <int L>
struct Isa;
template <>
struct Isa<kV4> {
  using V = vec16;
  static constexpr int kRows = 8, kCols = 3, kGemvCols = 2, kPackedRows = 4, kPackedCols = 4;
};
template <>
struct Isa<kV3> {
  using V = vec8;
  static constexpr int kRows = 6, kCols = 2, kGemvCols = 2, kPackedRows = 1, kPackedCols = 8;
};
template <>
struct Isa<kBaseline> {
  using V = vec4;
  static constexpr int kRows = 6, kCols = 2, kGemvCols = 2, kPackedRows = 1, kPackedCols = 8;
};
constexpr int kChains = 8;

template <typename V, int R, int C>
LORA_INLINE void fma_k(V (&acc)[R][C], const float* const* in, int64_t k, const float* wk) {
  V wv[C];
  for (int c = 0; c < C; ++c) wv[c] = load<V>(wk + c * kLanes<V>);
  for (int i = 0; i < R; ++i) {
    const float s = in[i][k];
    for (int c = 0; c < C; ++c) acc[i][c] += s * wv[c];
  }
}

// out[i][col : col + C*lanes] (+)= sum over k < depth of in[i][k] * w[k, col : col + C*lanes], for
// R rows; w has row stride ldw. A one-row tile splits k over U sets of accumulators.
template <typename V, int R, int C, bool kAdd>
LORA_INLINE void tile(const float* const* in, int64_t depth, const float* w, int64_t ldw, int64_t col,
                      float* const* out) {
  constexpr int U = R == 1 ? std::max(1, kChains / C) : 1;
  V acc[U][R][C] = {};
  int64_t k = 0;
  for (; k + U <= depth; k += U)
    for (int u = 0; u < U; ++u) fma_k<V, R, C>(acc[u], in, k + u, w + (k + u) * ldw + col);
  for (; k < depth; ++k) fma_k<V, R, C>(acc[0], in, k, w + k * ldw + col);
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) acc[0][i][c] += acc[u][i][c];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) {
      float* o = out[i] + col + c * kLanes<V>;
      store(o, kAdd ? load<V>(o) + acc[0][i][c] : acc[0][i][c]);
    }
}

// Every column of out[i][0 : width): tiles of C vectors, then one vector at a time, narrower and
// narrower down to single floats.
template <typename V, int R, int C, bool kAdd>
LORA_INLINE void all_columns(const float* const* in, int64_t depth, const float* w, int64_t ldw, int64_t width,
                             float* const* out, int64_t col = 0) {
  for (; col + C * kLanes<V> <= width; col += C * kLanes<V>) tile<V, R, C, kAdd>(in, depth, w, ldw, col, out);
  if constexpr (C > 1) {
    all_columns<V, R, 1, kAdd>(in, depth, w, ldw, width, out, col);
  } else if constexpr (!std::is_same_v<V, float>) {
    all_columns<typename Narrower<V>::type, R, 1, kAdd>(in, depth, w, ldw, width, out, col);
  }
}

// One target's delta for R rows: shrink v = x A into v [R, rank], then expand y += v B.
template <int L, int R>
LORA_INLINE void rows_delta(const float* const* x, int64_t h_in, const float* a, int64_t rank, float* v,
                            const float* b, int64_t h_out, float* const* y) {
  using V = typename Isa<L>::V;
  constexpr int C = R == 1 ? Isa<L>::kGemvCols : Isa<L>::kCols;
  float* vrow[R];
  for (int i = 0; i < R; ++i) vrow[i] = v + i * rank;
  all_columns<V, R, C, false>(x, h_in, a, rank, rank, vrow);
  all_columns<V, R, C, true>(vrow, rank, b, h_out, h_out, y);
}

template <int L, int R = Isa<L>::kRows>
LORA_INLINE void block_delta(int rows, const float* const* x, int64_t h_in, const float* a, int64_t rank, float* v,
                             const float* b, int64_t h_out, float* const* y) {
  if constexpr (R > 1) {
    if (rows < R) return block_delta<L, R - 1>(rows, x, h_in, a, rank, v, b, h_out, y);
  }
  rows_delta<L, R>(x, h_in, a, rank, v, b, h_out, y);
}

struct Call {
  const float* x;
  int64_t ldx, h_in;
  float* y;
  int64_t ldy;
  const int64_t* columns;  // [targets, 3]: first output column, h_out, h_in
  const int64_t* weights;  // [targets, slots, 3]: A address, B address, rank (0: nothing)
  int64_t num_targets, num_slots;
  const int32_t* rows;     // tokens with an adapter, grouped by slot
  const int32_t* items;    // [items, 3]: slot, first index into rows, count
};

// One item: every target's delta for `count` tokens of one slot, kRows tokens at a time.
// v: scratch for one tile's [rows, rank], grown once per thread.
template <int L>
LORA_INLINE void run_item(const Call& c, int64_t item, std::vector<float>& v) {
  constexpr int kRows = Isa<L>::kRows;
  const int32_t slot = c.items[3 * item], first = c.items[3 * item + 1], count = c.items[3 * item + 2];
  const int32_t* tokens = c.rows + first;
  for (int64_t t = 0; t < c.num_targets; ++t) {
    const int64_t* w = c.weights + 3 * (t * c.num_slots + slot);
    const int64_t rank = w[2];
    if (rank == 0) continue;
    const float* a = reinterpret_cast<const float*>(w[0]);
    const float* b = reinterpret_cast<const float*>(w[1]);
    const int64_t start = c.columns[3 * t], h_out = c.columns[3 * t + 1];
    if (v.size() < static_cast<size_t>(kRows * rank)) v.resize(static_cast<size_t>(kRows * rank));
    for (int i0 = 0; i0 < count; i0 += kRows) {
      const float* x[kRows];
      float* y[kRows];
      const int rows = std::min(kRows, count - i0);
      for (int i = 0; i < rows; ++i) {
        x[i] = c.x + tokens[i0 + i] * c.ldx;
        y[i] = c.y + tokens[i0 + i] * c.ldy + start;
      }
      block_delta<L>(rows, x, c.h_in, a, rank, v.data(), b, h_out, y);
    }
  }
}

// The items from the shared counter on, in one thread.
template <int L>
LORA_INLINE void run_items(const Call& c, std::atomic<int64_t>& next, int64_t num_items) {
  thread_local std::vector<float> v;
  for (int64_t item = next++; item < num_items; item = next++) run_item<L>(c, item, v);
}

// ---- Few rows through a base weight in oneDNN's packed layout ----
// A decode step of one or a few sequences multiplies a few rows by every base weight: bound by
// reading the weight. oneDNN's matmul reads a packed weight at 15-20 GB/s there (one row, 2 threads,
// AMD EPYC), below what a stream of the same bytes reaches; this loop reads each weight once for
// all the rows, in the packed layout itself, so the packed weight stays the only copy. That layout
// (models/cpu_linear.py checks it against the plain weight before it uses this path):
// [ceil(out / ob)][ip][ob], the ob outputs of a block side by side for each input, ip >= in.
struct Packed {
  const float* x;
  int64_t ldx, in;
  const float* w;
  int64_t out, ob, ip;
  const float* bias;  // nullptr: none
  float* y;
  int64_t ldy, rows;
};

// y[r][base + col : + C*lanes] = x[r] . W[those outputs] (+ bias) for R rows; wb: the block.
template <typename V, int R, int C>
LORA_INLINE void packed_tile(const Packed& p, const float* const* x, float* const* y, const float* wb, int64_t base,
                             int64_t col) {
  V acc[R][C] = {};
  for (int64_t i = 0; i < p.in; ++i) fma_k<V, R, C>(acc, x, i, wb + i * p.ob + col);
  for (int c = 0; c < C; ++c) {
    const int64_t o = base + col + c * kLanes<V>;
    const V bias = p.bias ? load<V>(p.bias + o) : V{};
    for (int r = 0; r < R; ++r) store(y[r] + o, acc[r][c] + bias);
  }
}

// The block's `width` outputs: tiles of C vectors (one pass over the block's inputs for all its
// outputs when they fit: passes over parts of a block's rows read at about half the speed), then
// tiles half as wide, down to one vector, then narrower vectors down to single floats (a last block
// may hold fewer than ob outputs).
template <typename V, int R, int C>
LORA_INLINE void packed_columns(const Packed& p, const float* const* x, float* const* y, const float* wb,
                                int64_t base, int64_t width, int64_t col = 0) {
  for (; col + C * kLanes<V> <= width; col += C * kLanes<V>) packed_tile<V, R, C>(p, x, y, wb, base, col);
  if constexpr (C > 1) {
    packed_columns<V, R, C / 2>(p, x, y, wb, base, width, col);
  } else if constexpr (!std::is_same_v<V, float>) {
    packed_columns<typename Narrower<V>::type, R, 1>(p, x, y, wb, base, width, col);
  }
}

template <int L, int R = Isa<L>::kPackedRows>
LORA_INLINE void packed_rows(int rows, const Packed& p, const float* const* x, float* const* y, const float* wb,
                             int64_t base, int64_t width) {
  if constexpr (R > 1) {
    if (rows < R) return packed_rows<L, R - 1>(rows, p, x, y, wb, base, width);
  }
  packed_columns<typename Isa<L>::V, R, Isa<L>::kPackedCols>(p, x, y, wb, base, width);
}

// One block of ob outputs for every row, a tile of rows at a time (the block, ip x ob floats,
// stays in L2 for the next rows).
template <int L>
LORA_INLINE void packed_block(const Packed& p, int64_t b) {
  const float* wb = p.w + b * p.ip * p.ob;
  const int64_t base = b * p.ob, width = std::min(p.ob, p.out - base);
  constexpr int kRows = Isa<L>::kPackedRows;
  for (int64_t r0 = 0; r0 < p.rows; r0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, p.rows - r0));
    const float* x[kRows];
    float* y[kRows];
    for (int r = 0; r < rows; ++r) {
      x[r] = p.x + (r0 + r) * p.ldx;
      y[r] = p.y + (r0 + r) * p.ldy;
    }
    packed_rows<L>(rows, p, x, y, wb, base, width);
  }
}

template <int L>
LORA_INLINE void packed_blocks(const Packed& p, std::atomic<int64_t>& next, int64_t num_blocks) {
  for (int64_t b = next++; b < num_blocks; b = next++) packed_block<L>(p, b);
}

using ItemsFn = void (*)(const Call&, std::atomic<int64_t>&, int64_t);

#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_X86 1
__attribute__((target("avx512f,avx2,fma"))) void items_v4(const Call& c, std::atomic<int64_t>& n, int64_t k) {
  run_items<kV4>(c, n, k);
}
__attribute__((target("avx2,fma"))) void items_v3(const Call& c, std::atomic<int64_t>& n, int64_t k) {
  run_items<kV3>(c, n, k);
}
#endif
void items_baseline(const Call& c, std::atomic<int64_t>& n, int64_t k) { run_items<kBaseline>(c, n, k); }

using PackedFn = void (*)(const Packed&, std::atomic<int64_t>&, int64_t);
#ifdef LORA_X86
__attribute__((target("avx512f,avx2,fma"))) void packed_v4(const Packed& p, std::atomic<int64_t>& n, int64_t k) {
  packed_blocks<kV4>(p, n, k);
}
__attribute__((target("avx2,fma"))) void packed_v3(const Packed& p, std::atomic<int64_t>& n, int64_t k) {
  packed_blocks<kV3>(p, n, k);
}
#endif
void packed_baseline(const Packed& p, std::atomic<int64_t>& n, int64_t k) { packed_blocks<kBaseline>(p, n, k); }

// The levels this CPU (and its OS: the checks include the saved register state) runs, best first.
const std::vector<Level>& cpu_levels() {
  static const std::vector<Level> levels = [] {
    std::vector<Level> found;
#ifdef LORA_X86
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (v3 && __builtin_cpu_supports("avx512f")) found.push_back(kV4);
    if (v3) found.push_back(kV3);
#endif
    found.push_back(kBaseline);
    return found;
  }();
  return levels;
}

std::vector<std::string> isa_levels() {
  std::vector<std::string> names;
  for (Level level : cpu_levels()) names.emplace_back(kLevelNames[level]);
  return names;
}

// The level named `name`, which this CPU must run.
Level level_named(const std::string& name) {
  for (Level level : cpu_levels()) {
    if (name == kLevelNames[level]) return level;
  }
  TORCH_CHECK(false, "lora_cpu: ISA level '", name, "' is not one this CPU runs (",
              c10::Join(", ", isa_levels()), ")");
}

ItemsFn items_fn(const std::string& name) {
  switch (level_named(name)) {
#ifdef LORA_X86
    case kV4: return items_v4;
    case kV3: return items_v3;
#endif
    default: return items_baseline;
  }
}

PackedFn packed_fn(const std::string& name) {
  switch (level_named(name)) {
#ifdef LORA_X86
    case kV4: return packed_v4;
    case kV3: return packed_v3;
#endif
    default: return packed_baseline;
  }
}

void check_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& columns, const at::Tensor& weights,
                  const at::Tensor& rows, const at::Tensor& items) {
  for (const at::Tensor* m : {&y, &x}) {
    TORCH_CHECK(m->device().is_cpu() && m->scalar_type() == at::kFloat && m->dim() == 2 && m->stride(1) == 1,
                "lora_cpu: x and y must be float32 CPU matrices with unit column stride");
  }
  TORCH_CHECK(y.size(0) == x.size(0), "lora_cpu: x has ", x.size(0), " rows, y has ", y.size(0));
  TORCH_CHECK(columns.scalar_type() == at::kLong && columns.is_contiguous() && columns.dim() == 2 &&
              columns.size(1) == 3, "lora_cpu: columns must be contiguous int64 [targets, 3]");
  TORCH_CHECK(weights.scalar_type() == at::kLong && weights.is_contiguous() && weights.dim() == 3 &&
              weights.size(0) == columns.size(0) && weights.size(2) == 3,
              "lora_cpu: weights must be contiguous int64 [targets, slots, 3]");
  TORCH_CHECK(rows.scalar_type() == at::kInt && rows.is_contiguous() && rows.dim() == 1 &&
              items.scalar_type() == at::kInt && items.is_contiguous() && items.dim() == 2 && items.size(1) == 3,
              "lora_cpu: rows must be contiguous int32 [n], items int32 [items, 3]");
  const int64_t* col = columns.data_ptr<int64_t>();
  for (int64_t t = 0; t < columns.size(0); ++t) {
    TORCH_CHECK(col[3 * t] >= 0 && col[3 * t + 1] >= 0 && col[3 * t] + col[3 * t + 1] <= y.size(1) &&
                col[3 * t + 2] == x.size(1), "lora_cpu: target ", t, " does not fit x ", x.sizes(), " / y ", y.sizes());
  }
  const int32_t* r = rows.data_ptr<int32_t>();
  TORCH_CHECK(std::all_of(r, r + rows.numel(), [&](int32_t v) { return v >= 0 && v < x.size(0); }),
              "lora_cpu: a token index is outside x's ", x.size(0), " rows");
  const int32_t* it = items.data_ptr<int32_t>();
  for (int64_t i = 0; i < items.size(0); ++i) {
    TORCH_CHECK(it[3 * i] >= 0 && it[3 * i] < weights.size(1) && it[3 * i + 1] >= 0 && it[3 * i + 2] >= 0 &&
                it[3 * i + 1] + it[3 * i + 2] <= rows.numel(), "lora_cpu: item ", i, " is outside the plan");
  }
}

// OpenMP's join waits for every thread of the team, also one that has not started because other
// jobs hold its core: on a shared 2-core machine each of the 48-120 calls of a decode step then
// waited a scheduler time slice, and two threads ran a step 6-10x slower than one. A team of our
// own that never waits for a late helper fixed that, but on a quiet machine it competed for the
// second core with torch's OpenMP worker, which spins after every matmul (8-13 ms more per decode
// step than fork-join, docs/design.md). So: fork-join while the other threads come on time; after a call in
// which one started more than kLate after the region began, the next `calls` calls run on the
// calling thread alone, doubling while the probes find them late, back to the minimum once one is
// on time.
class Backoff {
 public:
  static constexpr std::chrono::microseconds kLate{200};
  static constexpr int kMinCalls = 16, kMaxCalls = 4096;

  // Whether this call runs alone (and counts it).
  bool alone() {
    int left = left_.load(std::memory_order_relaxed);
    while (left > 0 && !left_.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
    }
    return left > 0;
  }

  void observe(bool late) {
    if (!late) {
      calls_.store(kMinCalls, std::memory_order_relaxed);
      return;
    }
    const int calls = calls_.load(std::memory_order_relaxed);
    left_.store(calls, std::memory_order_relaxed);
    calls_.store(std::min(2 * calls, kMaxCalls), std::memory_order_relaxed);
  }

 private:
  std::atomic<int> left_{0}, calls_{kMinCalls};
};

Backoff backoff;

// `work(next)` takes items from the shared counter until none is left: on the calling thread
// alone, or on torch's intra-op threads while they come on time (Backoff). The GIL is released:
// other Python threads (response senders, loads) run meanwhile.
template <typename Work>
void run_items_shared(int64_t num_items, Work&& work) {
  if (num_items == 0) return;
  pybind11::gil_scoped_release no_gil;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  if (workers == 1 || backoff.alone()) return work(next);  // no parallel region
  using Clock = std::chrono::steady_clock;
  const Clock::time_point began = Clock::now();
  std::atomic<bool> late{false};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    if (at::get_thread_num() != 0 && Clock::now() - began > Backoff::kLate) late.store(true, std::memory_order_relaxed);
    work(next);
  });
  backoff.observe(late.load(std::memory_order_relaxed));
}

void apply(at::Tensor y, const at::Tensor& x, const at::Tensor& columns, const at::Tensor& weights,
           const at::Tensor& rows, const at::Tensor& items, const std::string& isa) {
  const ItemsFn run = items_fn(isa);
  check_inputs(y, x, columns, weights, rows, items);
  const Call c{x.data_ptr<float>(), x.stride(0), x.size(1), y.data_ptr<float>(), y.stride(0),
               columns.data_ptr<int64_t>(), weights.data_ptr<int64_t>(), weights.size(0), weights.size(1),
               rows.data_ptr<int32_t>(), items.data_ptr<int32_t>()};
  const int64_t num_items = items.size(0);
  run_items_shared(num_items, [&](std::atomic<int64_t>& next) { run(c, next, num_items); });
}

// y = x W^T (+ bias) with W [out, in] at address `weight` in the packed layout [ceil(out/ob)][ip][ob].
void few_rows(at::Tensor y, const at::Tensor& x, int64_t weight, int64_t out, int64_t ob, int64_t ip,
              const c10::optional<at::Tensor>& bias, const std::string& isa) {
  const PackedFn run = packed_fn(isa);
  const at::Tensor& out_rows = y;
  for (const at::Tensor* m : {&out_rows, &x}) {
    TORCH_CHECK(m->device().is_cpu() && m->scalar_type() == at::kFloat && m->dim() == 2 && m->stride(1) == 1,
                "lora_cpu.few_rows: x and y must be float32 CPU matrices with unit column stride");
  }
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == out, "lora_cpu.few_rows: y ", y.sizes(), " for x ", x.sizes(),
              " and ", out, " outputs");
  TORCH_CHECK(weight != 0 && ob > 0 && ip >= x.size(1), "lora_cpu.few_rows: no packed weight for ", x.size(1),
              " inputs (ob ", ob, ", ip ", ip, ")");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "lora_cpu.few_rows: bias must be contiguous float32 [", out, "]");
    b = bias->data_ptr<float>();
  }
  const Packed p{x.data_ptr<float>(), x.stride(0), x.size(1), reinterpret_cast<const float*>(weight), out, ob, ip, b,
                 y.data_ptr<float>(), y.stride(0), x.size(0)};
  const int64_t num_blocks = x.size(0) == 0 ? 0 : (out + ob - 1) / ob;
  run_items_shared(num_blocks, [&](std::atomic<int64_t>& next) { run(p, next, num_blocks); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CPU kernels of multilora.lora.native: the fused multi-LoRA op and few-row packed matmuls";
  m.def("apply", &apply,
        "y[t, target columns] += x[t] @ A[slot] @ B[slot] for every target and planned token, on ISA level `isa`",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("columns"), pybind11::arg("weights"),
        pybind11::arg("rows"), pybind11::arg("items"), pybind11::arg("isa"));
  m.def("few_rows", &few_rows,
        "y = x @ W.T (+ bias) for a few rows x, W in oneDNN's packed layout [ceil(out/ob)][ip][ob] at address `weight`",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("out"), pybind11::arg("ob"),
        pybind11::arg("ip"), pybind11::arg("bias"), pybind11::arg("isa"));
  m.def("isa_levels", &isa_levels, "The ISA levels this CPU runs, best first (v4, v3, baseline)");
}
