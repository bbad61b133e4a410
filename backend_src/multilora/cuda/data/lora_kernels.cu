// Batched multi-LoRA kernels: every token of a step applies its own adapter's delta, for every
// target of one projection at once (the targets share x: q, k and v of a fused qkv; gate and up).
//
//   shrink: v[t, target j, :r] = x[t] @ A_js           A_js, stored A^T [h_in, r] row-major
//   expand: y[t, columns of j] += v[t, target j, :r] @ B_js    scale*B^T stored [r, h_out_j]
//
// s is the token's adapter slot, r = its rank for target j (ranks differ per slot and target;
// nothing is padded, a block loops to its own rank). A rank of 0 or a null pointer means no
// adapter there; tokens without an adapter (slot -1) exit at once.
//
// The projection's descriptor `desc` (int64, J targets, S slots) holds what differs per target:
//   desc[j*S + s], desc[(J + j)*S + s], desc[(2J + j)*S + s]: A^T, scale*B^T, rank of (j, s)
//   desc[3JS + 3j + 0, 1, 2]: target j's first column in y, its h_out, its first column in v
// so every layer's calls of one shape share one launch plan, with their own x, y and desc.
//
// Two launch shapes share the same tile code:
//   *_token_*   (decode, BGMV-like): one block row per token, slot from token_slots[t].
//   *_segment_* (prefill, SGMV-like): one block row per segment of tokens sharing a slot; every
//               element of A or B a thread loads is applied to LORA_TM tokens, so the weights are
//               read once per tile of tokens instead of once per token.
// x, y, A, B share one element type (fp16, bf16 or fp32); v and all sums are fp32. Shrink splits
// h_in over its grid's y (with the target: blockIdx.y = j * splits + split) and each split writes
// its own partial sums, v[split * lds + t * ldv + column]: no atomics, nothing to zero before the
// launch; expand adds the splits up as it stages v. Expand's grid y runs over every target's column
// tiles in turn. y's target columns must be contiguous; its rows have stride ldy.
//
// Build: kernels/build_ptx.py (NVRTC 12.6, PTX ISA 8.5). The file includes no CUDA header so it
// also compiles as C++ under the CPU emulation used by tests/cuda.

#define LORA_MAX_THREADS 256  // blockDim.x must not exceed this (shared buffers are sized by it)
#define LORA_TM 8             // tokens per tile in the segment kernels
#define LORA_RCHUNK 128       // ranks staged in shared memory per pass in expand

struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

#ifndef LORA_EMULATION
__device__ __forceinline__ float lora_f16_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ unsigned short lora_f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif

__device__ __forceinline__ unsigned short lora_f32_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else  // older GPUs (runtime NVRTC fallback) and the CPU emulation: round to nearest even
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
#endif
}

// Element <-> fp32. `bits` is the element's raw bits (16 or 32 of them) taken out of a vector load.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16_t v) { return lora_f16_to_f32(v.bits); }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float((unsigned int)v.bits << 16); }
__device__ __forceinline__ float bits_to_f32(unsigned int b, const float*) { return __uint_as_float(b); }
__device__ __forceinline__ float bits_to_f32(unsigned int b, const f16_t*) {
  return lora_f16_to_f32((unsigned short)(b & 0xffffu));
}
__device__ __forceinline__ float bits_to_f32(unsigned int b, const bf16_t*) { return __uint_as_float(b << 16); }
__device__ __forceinline__ void from_f32(float f, float* out) { *out = f; }
__device__ __forceinline__ void from_f32(float f, f16_t* out) { out->bits = lora_f32_to_f16(f); }
__device__ __forceinline__ void from_f32(float f, bf16_t* out) { out->bits = lora_f32_to_bf16(f); }

__device__ __forceinline__ unsigned int word_of(const uint4& r, int i) {
  return i == 0 ? r.x : (i == 1 ? r.y : (i == 2 ? r.z : r.w));
}

// Element i of a 16-byte vector of T as fp32. The bit extraction keeps the vector in registers.
template <typename T>
__device__ __forceinline__ float raw_f32(const uint4& raw, int i) {
  const int per_word = 4 / (int)sizeof(T);  // 2 for 16-bit elements, 1 for fp32
  const unsigned int w = word_of(raw, i / per_word);
  return bits_to_f32(per_word == 2 ? (w >> (16 * (i % 2))) : w, static_cast<const T*>(nullptr));
}

// Loads n (<= N) consecutive elements from p as fp32, zero-filling the rest. One 16-byte load when
// `full` (the caller checked n == N and 16-byte alignment), element loads otherwise (odd ranks or
// widths, unaligned views).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, bool full, int n, float (&out)[N]) {
  if (full) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = raw_f32<T>(raw, i);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = i < n ? to_f32(p[i]) : 0.f;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Shrink for m (<= M) consecutive tokens x[0..m) against one slot's A, rows k0..k1 of h_in (an
// empty range writes zeros). Thread layout: cc threads span V*cc columns of A's row, G = blockDim/cc
// rows are in flight; the row groups' partial sums are tree-reduced in shared memory and written
// to this split's v.
template <typename T, int M>
__device__ void shrink_tile(const T* __restrict__ x, long long ldx, int m, const T* __restrict__ A,
                            int r, int k0, int k1, float* __restrict__ v, int ldv) {
  constexpr int V = 16 / (int)sizeof(T);
  __shared__ float red[LORA_MAX_THREADS * V];
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const bool vec_ok = (r % V == 0) && aligned16(A);
  const int C = (r + V - 1) / V;  // threads across one row of A
  for (int c0 = 0; c0 < C; c0 += nt) {  // more than one pass only when r > V * blockDim
    const int cc = min(C - c0, nt);
    const int G = nt / cc;
    const int g = tid / cc;
    const int c = c0 + tid % cc;
    const bool active = g < G;
    const int n = min(V, r - c * V);
    float acc[M][V];
#pragma unroll
    for (int mm = 0; mm < M; ++mm)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[mm][i] = 0.f;
    if (active) {
      for (int k = k0 + g; k < k1; k += G) {
        float a[V];
        load_vec(A + (long long)k * r + c * V, vec_ok && n == V, n, a);
#pragma unroll
        for (int mm = 0; mm < M; ++mm) {
          const float xv = mm < m ? to_f32(x[mm * ldx + k]) : 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) acc[mm][i] += xv * a[i];
        }
      }
    }
    // One token at a time keeps shared memory at blockDim * V floats whatever M is.
#pragma unroll
    for (int mm = 0; mm < M; ++mm) {
      if (mm >= m) break;  // m is uniform across the block, so the barriers below stay uniform
      if (active) {
#pragma unroll
        for (int i = 0; i < V; ++i) red[tid * V + i] = acc[mm][i];
      }
      __syncthreads();
      for (int live = G; live > 1;) {
        const int half = (live + 1) / 2;
        if (active && g < live - half) {
#pragma unroll
          for (int i = 0; i < V; ++i) red[tid * V + i] += red[(tid + half * cc) * V + i];
        }
        __syncthreads();
        live = half;
      }
      if (g == 0) {
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (i < n) v[mm * ldv + c * V + i] = red[tid * V + i];
      }
      __syncthreads();  // red is reused by the next token
    }
  }
}

// Expand for m (<= M) consecutive tokens: this thread owns columns n0..n0+V of column tile `tile`
// of y. v rows (the sum of the shrink's `splits` partials, lds apart) are staged in shared memory
// LORA_RCHUNK ranks at a time; each B element loaded feeds all m tokens.
template <typename T, int M>
__device__ void expand_tile(const float* __restrict__ v, int ldv, long long lds, int splits, int m,
                            const T* __restrict__ B, int r, int h_out, int tile, T* __restrict__ y,
                            long long ldy) {
  constexpr int V = 16 / (int)sizeof(T);
  __shared__ float sv[M * LORA_RCHUNK];
  const int tid = threadIdx.x;
  const int n0 = (tile * blockDim.x + tid) * V;
  const int n = min(V, h_out - n0);  // <= 0: no columns here, but the thread still joins barriers
  const bool vec_ok = (h_out % V == 0) && aligned16(B);
  float acc[M][V];
#pragma unroll
  for (int mm = 0; mm < M; ++mm)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[mm][i] = 0.f;
  for (int j0 = 0; j0 < r; j0 += LORA_RCHUNK) {
    const int jn = min(LORA_RCHUNK, r - j0);
    __syncthreads();  // the previous chunk is consumed
    for (int idx = tid; idx < M * LORA_RCHUNK; idx += blockDim.x) {
      const int mm = idx / LORA_RCHUNK;
      const int j = idx % LORA_RCHUNK;
      float s = 0.f;
      if (mm < m && j < jn)
        for (int p = 0; p < splits; ++p) s += v[p * lds + mm * ldv + j0 + j];
      sv[idx] = s;
    }
    __syncthreads();
    if (n > 0) {
      for (int j = 0; j < jn; ++j) {
        float b[V];
        load_vec(B + (long long)(j0 + j) * h_out + n0, vec_ok && n == V, n, b);
#pragma unroll
        for (int mm = 0; mm < M; ++mm) {
          const float s = sv[mm * LORA_RCHUNK + j];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[mm][i] += s * b[i];
        }
      }
    }
  }
  if (n > 0) {
#pragma unroll
    for (int mm = 0; mm < M; ++mm) {
      if (mm < m) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          if (i < n) {
            T* p = y + mm * ldy + n0 + i;
            from_f32(to_f32(*p) + acc[mm][i], p);
          }
        }
      }
    }
  }
}

// One target of the descriptor for one slot: its weights, rank and columns (see the top of the file).
struct LoraTarget {
  const void* w;  // A^T for shrink, scale*B^T for expand
  int r;
  int col;    // first column in y
  int h_out;
  int v_col;  // first column in v
};

__device__ __forceinline__ LoraTarget lora_target(const long long* desc, int num_targets, int num_slots,
                                                  int j, int slot, int which) {  // which: 0 = A, 1 = B
  const long long js = (long long)j * num_slots + slot;
  const long long plane = (long long)num_targets * num_slots;
  const long long* cols = desc + 3 * plane + 3 * j;
  LoraTarget t;
  t.w = reinterpret_cast<const void*>(desc[which * plane + js]);
  t.r = (int)desc[2 * plane + js];
  t.col = (int)cols[0];
  t.h_out = (int)cols[1];
  t.v_col = (int)cols[2];
  return t;
}

// Expand's grid y covers the targets' column tiles of blockDim * V columns in turn: which target
// this block serves (-1: past the last tile) and its tile within that target.
template <typename T>
__device__ __forceinline__ int expand_target(const long long* desc, int num_targets, int num_slots, int* tile) {
  constexpr int V = 16 / (int)sizeof(T);
  const long long* cols = desc + 3LL * num_targets * num_slots;
  const int width = blockDim.x * V;
  int rest = blockIdx.y;
  for (int j = 0; j < num_targets; ++j) {
    const int tiles = ((int)cols[3 * j + 1] + width - 1) / width;
    if (rest < tiles) {
      *tile = rest;
      return j;
    }
    rest -= tiles;
  }
  return -1;
}

// grid (num_tokens, targets * k splits); k_chunk = rows of h_in per split.
template <typename T>
__device__ void shrink_token(const T* x, long long ldx, float* v, int ldv, long long lds, const long long* desc,
                             int num_targets, int num_slots, const int* token_slots, int num_tokens, int h_in,
                             int k_chunk) {
  const int t = blockIdx.x;
  if (t >= num_tokens) return;
  const int slot = token_slots[t];
  if (slot < 0) return;
  const int splits = gridDim.y / num_targets;
  const int split = blockIdx.y % splits;
  const LoraTarget g = lora_target(desc, num_targets, num_slots, blockIdx.y / splits, slot, 0);
  if (g.r <= 0 || g.w == nullptr) return;
  const int k0 = split * k_chunk;
  shrink_tile<T, 1>(x + t * ldx, ldx, 1, static_cast<const T*>(g.w), g.r, k0, min(h_in, k0 + k_chunk),
                    v + split * lds + (long long)t * ldv + g.v_col, ldv);
}

// grid (num_tokens, column tiles of every target).
template <typename T>
__device__ void expand_token(const float* v, int ldv, long long lds, int splits, T* y, long long ldy,
                             const long long* desc, int num_targets, int num_slots, const int* token_slots,
                             int num_tokens) {
  const int t = blockIdx.x;
  if (t >= num_tokens) return;
  const int slot = token_slots[t];
  if (slot < 0) return;
  int tile;
  const int j = expand_target<T>(desc, num_targets, num_slots, &tile);
  if (j < 0) return;
  const LoraTarget g = lora_target(desc, num_targets, num_slots, j, slot, 1);
  if (g.r <= 0 || g.w == nullptr) return;
  expand_tile<T, 1>(v + (long long)t * ldv + g.v_col, ldv, lds, splits, 1, static_cast<const T*>(g.w), g.r,
                    g.h_out, tile, y + t * ldy + g.col, ldy);
}

// grid (num_segments, targets * k splits, token-tile strides); blockIdx.z walks the segment's tiles.
template <typename T>
__device__ void shrink_segment(const T* x, long long ldx, float* v, int ldv, long long lds, const long long* desc,
                               int num_targets, int num_slots, const int* seg_starts, const int* seg_ends,
                               const int* seg_slots, int num_segments, int h_in, int k_chunk) {
  const int s = blockIdx.x;
  if (s >= num_segments) return;
  const int slot = seg_slots[s];
  if (slot < 0) return;
  const int splits = gridDim.y / num_targets;
  const int split = blockIdx.y % splits;
  const LoraTarget g = lora_target(desc, num_targets, num_slots, blockIdx.y / splits, slot, 0);
  if (g.r <= 0 || g.w == nullptr) return;
  const int k0 = split * k_chunk;
  const int k1 = min(h_in, k0 + k_chunk);
  const int end = seg_ends[s];
  for (int t0 = seg_starts[s] + blockIdx.z * LORA_TM; t0 < end; t0 += gridDim.z * LORA_TM) {
    shrink_tile<T, LORA_TM>(x + t0 * ldx, ldx, min(LORA_TM, end - t0), static_cast<const T*>(g.w), g.r, k0,
                            k1, v + split * lds + (long long)t0 * ldv + g.v_col, ldv);
  }
}

// grid (num_segments, column tiles of every target, token-tile strides).
template <typename T>
__device__ void expand_segment(const float* v, int ldv, long long lds, int splits, T* y, long long ldy,
                               const long long* desc, int num_targets, int num_slots, const int* seg_starts,
                               const int* seg_ends, const int* seg_slots, int num_segments) {
  const int s = blockIdx.x;
  if (s >= num_segments) return;
  const int slot = seg_slots[s];
  if (slot < 0) return;
  int tile;
  const int j = expand_target<T>(desc, num_targets, num_slots, &tile);
  if (j < 0) return;
  const LoraTarget g = lora_target(desc, num_targets, num_slots, j, slot, 1);
  if (g.r <= 0 || g.w == nullptr) return;
  const int end = seg_ends[s];
  for (int t0 = seg_starts[s] + blockIdx.z * LORA_TM; t0 < end; t0 += gridDim.z * LORA_TM) {
    expand_tile<T, LORA_TM>(v + (long long)t0 * ldv + g.v_col, ldv, lds, splits, min(LORA_TM, end - t0),
                            static_cast<const T*>(g.w), g.r, g.h_out, tile, y + t0 * ldy + g.col, ldy);
  }
}

// Unmangled entry points, one set per element type: lora_{shrink,expand}_{token,segment}_{SUF}.
// The segment shrink says "at least 1 block per SM": without it ptxas 12.6 held the fp32 one to 64
// registers and spilled (the bound only lets it use the registers the block size allows anyway).
#define LORA_DEFINE_KERNELS(SUF, T)                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS) lora_shrink_token_##SUF(         \
      const T* x, long long ldx, float* v, int ldv, long long lds, const long long* desc,         \
      int num_targets, int num_slots, const int* token_slots, int num_tokens, int h_in,           \
      int k_chunk) {                                                                              \
    shrink_token<T>(x, ldx, v, ldv, lds, desc, num_targets, num_slots, token_slots, num_tokens,   \
                    h_in, k_chunk);                                                               \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS) lora_expand_token_##SUF(         \
      const float* v, int ldv, long long lds, int splits, T* y, long long ldy,                    \
      const long long* desc, int num_targets, int num_slots, const int* token_slots,              \
      int num_tokens) {                                                                           \
    expand_token<T>(v, ldv, lds, splits, y, ldy, desc, num_targets, num_slots, token_slots,       \
                    num_tokens);                                                                  \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS, 1) lora_shrink_segment_##SUF(       \
      const T* x, long long ldx, float* v, int ldv, long long lds, const long long* desc,         \
      int num_targets, int num_slots, const int* seg_starts, const int* seg_ends,                 \
      const int* seg_slots, int num_segments, int h_in, int k_chunk) {                            \
    shrink_segment<T>(x, ldx, v, ldv, lds, desc, num_targets, num_slots, seg_starts, seg_ends,    \
                      seg_slots, num_segments, h_in, k_chunk);                                    \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS) lora_expand_segment_##SUF(       \
      const float* v, int ldv, long long lds, int splits, T* y, long long ldy,                    \
      const long long* desc, int num_targets, int num_slots, const int* seg_starts,               \
      const int* seg_ends, const int* seg_slots, int num_segments) {                              \
    expand_segment<T>(v, ldv, lds, splits, y, ldy, desc, num_targets, num_slots, seg_starts,      \
                      seg_ends, seg_slots, num_segments);                                         \
  }

LORA_DEFINE_KERNELS(f16, f16_t)
LORA_DEFINE_KERNELS(bf16, bf16_t)
LORA_DEFINE_KERNELS(f32, float)

// ---------------------------------------------------------------------------------------------
// Paged decode attention: one query per row and head against the row's context in the paged KV
// cache, read in place through the row's block table (no gathered copy of the context):
//
//   out[r, h] = softmax_j(scale * q[r, h] . K[slot(r, j), h / G]) @ V[slot(r, j), h / G]
//   j in [lo, ctx_lens[r]), lo = max(0, ctx_lens[r] - window) (window 0: lo = 0)
//   slot(r, j) = block_tables[r * ld_table + j / block_size] * block_size + j % block_size
//
// K and V caches are dense [slots, kv_heads, head_dim]; q and out rows are [heads, head_dim] with a
// row stride. G = heads / kv_heads query heads share a KV head (GQA); one block serves up to
// PA_GROUP of them, so every K/V element it loads is used by all of them.
//
// Grid (rows, kv_heads * group tiles, splits). Split s takes keys [lo + s * split_len, ..) of the
// row; with one split the block writes out directly, with several each writes its normalised
// partial output and (max, sum) in fp32 and paged_reduce merges them (split-k for long contexts).
// Inside a block, `lpk` lanes (a power of two <= 32) share a key, each holding 16-byte chunks of
// head_dim; the block's lane groups walk the keys PA_KPT at a time with their own online softmax
// (scores in log2 units, fp32), and merge through shared memory at the end.

#define PA_THREADS 128  // blockDim.x of both kernels (a multiple of 32: whole warps share keys)
#define PA_GROUP 4      // query heads per block; larger GQA groups take several blocks
#define PA_MAX_D 256    // largest head_dim

__device__ __forceinline__ float pa_neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ unsigned int elem_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned int elem_bits(f16_t v) { return v.bits; }
__device__ __forceinline__ unsigned int elem_bits(bf16_t v) { return v.bits; }

// n (<= 16 / sizeof(T)) elements at p as the bits of one 16-byte vector, zero past n: one vector
// load when `full`, element loads otherwise. Kept as raw bits until used, to save registers.
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* p, bool full, int n) {
  if (full) return *reinterpret_cast<const uint4*>(p);
  constexpr int per_word = 4 / (int)sizeof(T);
  unsigned int w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16 / (int)sizeof(T); ++i)
    if (i < n) w[i / per_word] |= elem_bits(p[i]) << (32 / per_word * (i % per_word));
  uint4 r;
  r.x = w[0];
  r.y = w[1];
  r.z = w[2];
  r.w = w[3];
  return r;
}

template <typename T>
struct PaShape {
  static constexpr int V = 16 / (int)sizeof(T);            // elements per 16-byte chunk
  static constexpr int CPL = PA_MAX_D / (32 * V);          // chunks per lane: 1 (16-bit), 2 (fp32)
  static constexpr int KPT = V / 2;                        // keys per lane group per step: 4, 2
};

// Sums v over the lpk lanes of a key group (lanes lpk-aligned within the warp); all get the sum.
__device__ __forceinline__ float pa_group_sum(float v, int lpk) {
  for (int offset = lpk / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ void paged_decode(const T* q, long long ldq, const T* k_cache, const T* v_cache,
                             const long long* block_tables, int ld_table, const long long* ctx_lens,
                             int num_rows, int num_heads, int kv_heads, int head_dim,
                             int block_size, int window, float scale, int split_len, T* out,
                             long long ldo, float* part_out, float* part_ml) {
  constexpr int V = PaShape<T>::V, CPL = PaShape<T>::CPL, KPT = PaShape<T>::KPT;
  __shared__ float sm_m[PA_THREADS], sm_l[PA_THREADS];  // per lane group
  __shared__ float sm_acc[PA_THREADS * CPL * V];        // [group][lpk * CPL * V]
  const int row = blockIdx.x;
  if (row >= num_rows) return;
  const int group = num_heads / kv_heads;
  const int tiles = gridDim.y / kv_heads;
  const int kvh = blockIdx.y / tiles;
  const int h0 = kvh * group + (blockIdx.y % tiles) * PA_GROUP;  // this block's first query head
  const int ng = min(PA_GROUP, (kvh + 1) * group - h0);
  const int chunks = (head_dim + V - 1) / V;
  int lpk = 1;
  while (lpk < chunks && lpk < 32) lpk *= 2;
  const int lane = threadIdx.x % lpk;
  const int key_group = threadIdx.x / lpk;
  const int groups = blockDim.x / lpk;
  const int ctx = (int)ctx_lens[row];
  const int k0 = (window > 0 ? max(0, ctx - window) : 0) + (int)blockIdx.z * split_len;
  const int k1 = min(ctx, k0 + split_len);  // k0 >= k1: a split past this row's context

  // This lane's chunks of the block's queries, pre-scaled so that scores are in log2 units.
  const float qscale = scale * 1.4426950408889634f;
  const bool qvec = head_dim % V == 0 && ldq % V == 0 && aligned16(q);
  float qf[PA_GROUP][CPL][V];
#pragma unroll
  for (int g = 0; g < PA_GROUP; ++g)
#pragma unroll
    for (int ci = 0; ci < CPL; ++ci) {
      const int c = lane + ci * lpk;
      const int n = g < ng ? min(V, head_dim - c * V) : 0;
      const uint4 raw = load_raw(q + row * ldq + (long long)(h0 + g) * head_dim + c * V, qvec && n == V, n);
#pragma unroll
      for (int i = 0; i < V; ++i) qf[g][ci][i] = raw_f32<T>(raw, i) * qscale;
    }

  const bool kvec = head_dim % V == 0 && aligned16(k_cache) && aligned16(v_cache);
  const long long* table = block_tables + (long long)row * ld_table;
  float m[PA_GROUP], l[PA_GROUP], acc[PA_GROUP][CPL][V];
#pragma unroll
  for (int g = 0; g < PA_GROUP; ++g) {
    m[g] = pa_neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int ci = 0; ci < CPL; ++ci)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[g][ci][i] = 0.f;
  }
  // The loop bound is uniform across the block: every lane of a warp reaches the shuffles.
  for (int base = k0; base < k1; base += groups * KPT) {
    uint4 kr[KPT][CPL], vr[KPT][CPL];
    bool valid[KPT];
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk) {
      const int j = base + kk * groups + key_group;
      valid[kk] = j < k1;
      const long long slot = valid[kk] ? table[j / block_size] * block_size + j % block_size : 0;
      const long long offset = (slot * kv_heads + kvh) * head_dim;
#pragma unroll
      for (int ci = 0; ci < CPL; ++ci) {
        const int c = lane + ci * lpk;
        const int n = valid[kk] ? min(V, head_dim - c * V) : 0;
        kr[kk][ci] = load_raw(k_cache + offset + c * V, kvec && n == V, n);
        vr[kk][ci] = load_raw(v_cache + offset + c * V, kvec && n == V, n);
      }
    }
    float s[KPT][PA_GROUP];
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk)
#pragma unroll
      for (int g = 0; g < PA_GROUP; ++g) {
        if (g >= ng) break;  // ng is uniform across the block
        float dot = 0.f;
#pragma unroll
        for (int ci = 0; ci < CPL; ++ci)
#pragma unroll
          for (int i = 0; i < V; ++i) dot += qf[g][ci][i] * raw_f32<T>(kr[kk][ci], i);
        dot = pa_group_sum(dot, lpk);
        s[kk][g] = valid[kk] ? dot : pa_neg_inf();
      }
#pragma unroll
    for (int g = 0; g < PA_GROUP; ++g) {
      if (g >= ng) break;
      float mx = m[g];
#pragma unroll
      for (int kk = 0; kk < KPT; ++kk) mx = fmaxf(mx, s[kk][g]);
      const float ref = mx == pa_neg_inf() ? 0.f : mx;  // nothing visible yet: l, acc stay 0
      const float alpha = exp2f(m[g] - ref);
      l[g] *= alpha;
#pragma unroll
      for (int ci = 0; ci < CPL; ++ci)
#pragma unroll
        for (int i = 0; i < V; ++i) acc[g][ci][i] *= alpha;
#pragma unroll
      for (int kk = 0; kk < KPT; ++kk) {
        const float p = exp2f(s[kk][g] - ref);
        l[g] += p;
#pragma unroll
        for (int ci = 0; ci < CPL; ++ci)
#pragma unroll
          for (int i = 0; i < V; ++i) acc[g][ci][i] += p * raw_f32<T>(vr[kk][ci], i);
      }
      m[g] = mx;
    }
  }

  // Merge the lane groups, one head at a time (shared memory for one head's partials only).
  const int width = lpk * CPL * V;
  const int splits = gridDim.z;
#pragma unroll
  for (int g = 0; g < PA_GROUP; ++g) {
    if (g >= ng) break;
    __syncthreads();  // the previous head's partials are consumed
    if (lane == 0) {
      sm_m[key_group] = m[g];
      sm_l[key_group] = l[g];
    }
#pragma unroll
    for (int ci = 0; ci < CPL; ++ci)
#pragma unroll
      for (int i = 0; i < V; ++i) sm_acc[key_group * width + (lane + ci * lpk) * V + i] = acc[g][ci][i];
    __syncthreads();
    float mx = pa_neg_inf();
    for (int k = 0; k < groups; ++k) mx = fmaxf(mx, sm_m[k]);
    const float ref = mx == pa_neg_inf() ? 0.f : mx;
    float sum = 0.f;
    for (int k = 0; k < groups; ++k) sum += sm_l[k] * exp2f(sm_m[k] - ref);
    const long long head = (long long)row * num_heads + h0 + g;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
      float o = 0.f;
      for (int k = 0; k < groups; ++k) o += sm_acc[k * width + d] * exp2f(sm_m[k] - ref);
      o = sum > 0.f ? o / sum : 0.f;
      if (splits == 1) {
        from_f32(o, out + row * ldo + (long long)(h0 + g) * head_dim + d);
      } else {
        part_out[(head * splits + blockIdx.z) * head_dim + d] = o;
      }
    }
    if (splits > 1 && threadIdx.x == 0) {
      part_ml[(head * splits + blockIdx.z) * 2] = mx;
      part_ml[(head * splits + blockIdx.z) * 2 + 1] = sum;
    }
  }
}

// grid (rows, heads): merges the splits' normalised partials by their (max, sum) in log2 units.
template <typename T>
__device__ void paged_reduce(const float* part_out, const float* part_ml, int num_splits,
                             int num_heads, int head_dim, T* out, long long ldo) {
  const long long head = (long long)blockIdx.x * num_heads + blockIdx.y;
  const float* ml = part_ml + head * num_splits * 2;
  float mx = pa_neg_inf();
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ml[2 * s]);
  const float ref = mx == pa_neg_inf() ? 0.f : mx;
  float sum = 0.f;
  for (int s = 0; s < num_splits; ++s) sum += ml[2 * s + 1] * exp2f(ml[2 * s] - ref);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s)
      o += part_out[(head * num_splits + s) * head_dim + d] * ml[2 * s + 1] * exp2f(ml[2 * s] - ref);
    from_f32(sum > 0.f ? o / sum : 0.f, out + blockIdx.x * ldo + (long long)blockIdx.y * head_dim + d);
  }
}

// Unmangled entry points: paged_{decode,reduce}_{SUF}.
#define PA_DEFINE_KERNELS(SUF, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_decode_##SUF(                    \
      const T* q, long long ldq, const T* k_cache, const T* v_cache,                              \
      const long long* block_tables, int ld_table, const long long* ctx_lens, int num_rows,       \
      int num_heads, int kv_heads, int head_dim, int block_size, int window, float scale,         \
      int split_len, T* out, long long ldo, float* part_out, float* part_ml) {                    \
    paged_decode<T>(q, ldq, k_cache, v_cache, block_tables, ld_table, ctx_lens, num_rows,         \
                    num_heads, kv_heads, head_dim, block_size, window, scale, split_len, out,     \
                    ldo, part_out, part_ml);                                                      \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_reduce_##SUF(                    \
      const float* part_out, const float* part_ml, int num_splits, int num_heads, int head_dim,   \
      T* out, long long ldo) {                                                                    \
    paged_reduce<T>(part_out, part_ml, num_splits, num_heads, head_dim, out, ldo);                \
  }

PA_DEFINE_KERNELS(f16, f16_t)
PA_DEFINE_KERNELS(bf16, bf16_t)
PA_DEFINE_KERNELS(f32, float)
