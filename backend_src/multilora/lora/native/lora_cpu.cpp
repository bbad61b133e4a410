// The fused CPU LoRA op: for every target i of one projection and every token t with an adapter,
//   y[t, start_i : start_i + h_out_i] += (x[t] @ A_i[slot t]) @ B_i[slot t]
// with A^T [h_in, r] and B^T [r, h_out] (scale folded in) read where the adapter slots put them.
//
// The step plan (ops_cpu.CpuStep) lists the tokens with an adapter grouped by slot and cut into
// work items (slot, tokens). An item reads its adapter's A and B of every target once for all of
// its tokens; x rows are read once per item and stay in L1 across the targets (q/k/v, gate/up).
// Items go to torch's intra-op threads (at::parallel_for, so the same OpenMP pool as every other
// op), each thread taking the next item from a shared counter: decode items (a few tokens,
// bandwidth-bound) and prefill items (many tokens, compute-bound) balance without a cost model.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace {

// One build runs on any x86-64: the item loop is compiled for the x86-64-v4 (AVX-512), v3 (AVX2,
// FMA) and baseline levels, and the dynamic loader picks the best the CPU has (GCC function
// multi-versioning; ISA levels, not CPU models: "arch=skylake-avx512" would skip an AMD EPYC).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORA_CLONES
#endif
#define LORA_INLINE inline __attribute__((always_inline))

// Explicit vectors (GCC vector extensions): 16 floats are one AVX-512 register, two AVX2 ones,
// four SSE ones. GCC's own vectorizer turned these tiles into gathers and scalar code. The last
// columns of odd ranks and widths go through the same tiles with narrower vectors, down to float.
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));

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

constexpr int kRows = 4;  // token rows per register tile

// v[i, j:j+lanes] = x_i @ a[:, j:j+lanes] for R rows, for each full chunk of lanes from j on;
// a: [h_in, rank]. Returns the first column not done.
template <int R, typename V>
LORA_INLINE int64_t shrink_chunks(int64_t j, int64_t rank, const float* const* x, int64_t h_in,
                                  const float* a, float* v) {
  for (; j + kLanes<V> <= rank; j += kLanes<V>) {
    V acc[R] = {};
    for (int64_t k = 0; k < h_in; ++k) {
      const V ak = load<V>(a + k * rank + j);
      for (int i = 0; i < R; ++i) acc[i] += x[i][k] * ak;
    }
    for (int i = 0; i < R; ++i) store(v + i * rank + j, acc[i]);
  }
  return j;
}

// y_i[col:col+N*lanes] += v[i, :] @ b[:, col:col+N*lanes] for R rows, for each full chunk from col
// on; b: [rank, h_out]. Returns the first column not done.
template <int R, typename V, int N>
LORA_INLINE int64_t expand_chunks(int64_t col, int64_t h_out, const float* v, int64_t rank, const float* b,
                                  float* const* y) {
  for (; col + N * kLanes<V> <= h_out; col += N * kLanes<V>) {
    V acc[R][N] = {};
    for (int64_t j = 0; j < rank; ++j) {
      V bj[N];
      for (int n = 0; n < N; ++n) bj[n] = load<V>(b + j * h_out + col + n * kLanes<V>);
      for (int i = 0; i < R; ++i) {
        const float vi = v[i * rank + j];
        for (int n = 0; n < N; ++n) acc[i][n] += vi * bj[n];
      }
    }
    for (int i = 0; i < R; ++i)
      for (int n = 0; n < N; ++n) {
        float* out = y[i] + col + n * kLanes<V>;
        store(out, load<V>(out) + acc[i][n]);
      }
  }
  return col;
}

// One target's delta for R rows: shrink into v [R, rank], then expand into the rows of y.
template <int R>
LORA_INLINE void rows_delta(const float* const* x, int64_t h_in, const float* a, int64_t rank, float* v,
                            const float* b, int64_t h_out, float* const* y) {
  int64_t j = shrink_chunks<R, vec16>(0, rank, x, h_in, a, v);
  j = shrink_chunks<R, vec8>(j, rank, x, h_in, a, v);
  j = shrink_chunks<R, vec4>(j, rank, x, h_in, a, v);
  shrink_chunks<R, float>(j, rank, x, h_in, a, v);
  int64_t col = expand_chunks<R, vec16, 2>(0, h_out, v, rank, b, y);
  col = expand_chunks<R, vec16, 1>(col, h_out, v, rank, b, y);
  col = expand_chunks<R, vec8, 1>(col, h_out, v, rank, b, y);
  col = expand_chunks<R, vec4, 1>(col, h_out, v, rank, b, y);
  expand_chunks<R, float, 1>(col, h_out, v, rank, b, y);
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

// One item: every target's delta for `count` tokens of one slot. v: [count, rank] scratch.
LORA_CLONES void run_item(const Call& c, int64_t item, std::vector<float>& v) {
  const int32_t slot = c.items[3 * item], first = c.items[3 * item + 1], count = c.items[3 * item + 2];
  const int32_t* tokens = c.rows + first;
  for (int64_t t = 0; t < c.num_targets; ++t) {
    const int64_t* w = c.weights + 3 * (t * c.num_slots + slot);
    const int64_t rank = w[2];
    if (rank == 0) continue;
    const float* a = reinterpret_cast<const float*>(w[0]);
    const float* b = reinterpret_cast<const float*>(w[1]);
    const int64_t start = c.columns[3 * t], h_out = c.columns[3 * t + 1];
    v.resize(static_cast<size_t>(count) * rank);
    for (int i0 = 0; i0 < count; i0 += kRows) {
      const float* x[kRows];
      float* y[kRows];
      const int rows = std::min(kRows, count - i0);
      for (int i = 0; i < rows; ++i) {
        x[i] = c.x + tokens[i0 + i] * c.ldx;
        y[i] = c.y + tokens[i0 + i] * c.ldy + start;
      }
      float* vi = v.data() + i0 * rank;
      switch (rows) {
        case 4: rows_delta<4>(x, c.h_in, a, rank, vi, b, h_out, y); break;
        case 3: rows_delta<3>(x, c.h_in, a, rank, vi, b, h_out, y); break;
        case 2: rows_delta<2>(x, c.h_in, a, rank, vi, b, h_out, y); break;
        default: rows_delta<1>(x, c.h_in, a, rank, vi, b, h_out, y); break;
      }
    }
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

void apply(at::Tensor y, const at::Tensor& x, const at::Tensor& columns, const at::Tensor& weights,
           const at::Tensor& rows, const at::Tensor& items) {
  check_inputs(y, x, columns, weights, rows, items);
  const Call c{x.data_ptr<float>(), x.stride(0), x.size(1), y.data_ptr<float>(), y.stride(0),
               columns.data_ptr<int64_t>(), weights.data_ptr<int64_t>(), weights.size(0), weights.size(1),
               rows.data_ptr<int32_t>(), items.data_ptr<int32_t>()};
  const int64_t num_items = items.size(0);
  if (num_items == 0) return;
  pybind11::gil_scoped_release no_gil;  // other Python threads (response senders, loads) run meanwhile
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> v;
    for (int64_t item = next++; item < num_items; item = next++) run_item(c, item, v);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-LoRA op for CPU (multilora.lora.native)";
  m.def("apply", &apply, "y[t, target columns] += x[t] @ A[slot] @ B[slot] for every target and planned token",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("columns"), pybind11::arg("weights"),
        pybind11::arg("rows"), pybind11::arg("items"));
}
