// Batched multi-LoRA kernels: every token of a step applies its own adapter's delta.
//
//   shrink: v[t, :r] += x[t] @ A_s          A_s = a_ptrs[s], A^T stored [h_in, r] row-major
//   expand: y[t, :]  += v[t, :r] @ B_s      B_s = b_ptrs[s], scale*B^T stored [r, h_out]
//
// s is the token's adapter slot, r = ranks[s] (ranks differ per slot; nothing is padded, a
// block loops to its own slot's rank). A slot with rank 0 or a null pointer has no adapter for
// this projection; tokens without an adapter (slot -1) exit at once.
//
// Two launch shapes share the same tile code:
//   *_token_*   (decode, BGMV-like): one block row per token, slot from token_slots[t].
//   *_segment_* (prefill, SGMV-like): one block row per segment of tokens sharing a slot; every
//               element of A or B a thread loads is applied to LORA_TM tokens, so the weights are
//               read once per tile of tokens instead of once per token.
// x, y, A, B share one element type (fp16, bf16 or fp32); v and all sums are fp32. Shrink splits
// h_in over gridDim.y and adds into v with atomics, so v must be zeroed before the shrink. y may be
// a column slice of a wider output (row stride ldy); its columns must be contiguous.
//
// Build: kernels/build_ptx.py (NVRTC 12.6, PTX ISA 8.5). The file includes no CUDA header so it
// also compiles as C++ under the CPU emulation used by tests/kernels.

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

// Loads n (<= N) consecutive elements from p as fp32, zero-filling the rest. One 16-byte load when
// `full` (the caller checked n == N and 16-byte alignment), element loads otherwise (odd ranks or
// widths, unaligned views). The bit extraction keeps the vector in registers (no local memory).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, bool full, int n, float (&out)[N]) {
  if (full) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int per_word = 4 / (int)sizeof(T);  // 2 for 16-bit elements, 1 for fp32
      const unsigned int w = word_of(raw, i / per_word);
      out[i] = bits_to_f32(per_word == 2 ? (w >> (16 * (i % 2))) : w, p);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = i < n ? to_f32(p[i]) : 0.f;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Shrink for m (<= M) consecutive tokens x[0..m) against one slot's A, rows k0..k1 of h_in.
// Thread layout: cc threads span V*cc columns of A's row, G = blockDim/cc rows are in flight; the
// row groups' partial sums are tree-reduced in shared memory and added into v.
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
          if (i < n) atomicAdd(&v[mm * ldv + c * V + i], red[tid * V + i]);
      }
      __syncthreads();  // red is reused by the next token
    }
  }
}

// Expand for m (<= M) consecutive tokens: this thread owns columns n0..n0+V of y. v rows are
// staged in shared memory LORA_RCHUNK ranks at a time; each B element loaded feeds all m tokens.
template <typename T, int M>
__device__ void expand_tile(const float* __restrict__ v, int ldv, int m, const T* __restrict__ B,
                            int r, int h_out, T* __restrict__ y, long long ldy) {
  constexpr int V = 16 / (int)sizeof(T);
  __shared__ float sv[M * LORA_RCHUNK];
  const int tid = threadIdx.x;
  const int n0 = (blockIdx.y * blockDim.x + tid) * V;
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
      sv[idx] = (mm < m && j < jn) ? v[mm * ldv + j0 + j] : 0.f;
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

// grid (num_tokens, k splits); k_chunk = rows of h_in per block row.
template <typename T>
__device__ void shrink_token(const T* x, long long ldx, float* v, int ldv, const long long* a_ptrs,
                             const int* ranks, const int* token_slots, int num_tokens, int h_in,
                             int k_chunk) {
  const int t = blockIdx.x;
  if (t >= num_tokens) return;
  const int slot = token_slots[t];
  if (slot < 0) return;
  const int r = ranks[slot];
  const T* A = reinterpret_cast<const T*>(a_ptrs[slot]);
  const int k0 = blockIdx.y * k_chunk;
  if (r <= 0 || A == nullptr || k0 >= h_in) return;
  shrink_tile<T, 1>(x + t * ldx, ldx, 1, A, r, k0, min(h_in, k0 + k_chunk), v + (long long)t * ldv, ldv);
}

// grid (num_tokens, column tiles of blockDim * V).
template <typename T>
__device__ void expand_token(const float* v, int ldv, T* y, long long ldy, const long long* b_ptrs,
                             const int* ranks, const int* token_slots, int num_tokens, int h_out) {
  const int t = blockIdx.x;
  if (t >= num_tokens) return;
  const int slot = token_slots[t];
  if (slot < 0) return;
  const int r = ranks[slot];
  const T* B = reinterpret_cast<const T*>(b_ptrs[slot]);
  if (r <= 0 || B == nullptr) return;
  expand_tile<T, 1>(v + (long long)t * ldv, ldv, 1, B, r, h_out, y + t * ldy, ldy);
}

// grid (num_segments, k splits, token-tile strides); blockIdx.z walks the segment's tiles.
template <typename T>
__device__ void shrink_segment(const T* x, long long ldx, float* v, int ldv, const long long* a_ptrs,
                               const int* ranks, const int* seg_starts, const int* seg_ends,
                               const int* seg_slots, int num_segments, int h_in, int k_chunk) {
  const int s = blockIdx.x;
  if (s >= num_segments) return;
  const int slot = seg_slots[s];
  if (slot < 0) return;
  const int r = ranks[slot];
  const T* A = reinterpret_cast<const T*>(a_ptrs[slot]);
  const int k0 = blockIdx.y * k_chunk;
  if (r <= 0 || A == nullptr || k0 >= h_in) return;
  const int k1 = min(h_in, k0 + k_chunk);
  const int end = seg_ends[s];
  for (int t0 = seg_starts[s] + blockIdx.z * LORA_TM; t0 < end; t0 += gridDim.z * LORA_TM) {
    shrink_tile<T, LORA_TM>(x + t0 * ldx, ldx, min(LORA_TM, end - t0), A, r, k0, k1,
                            v + (long long)t0 * ldv, ldv);
  }
}

// grid (num_segments, column tiles of blockDim * V, token-tile strides).
template <typename T>
__device__ void expand_segment(const float* v, int ldv, T* y, long long ldy, const long long* b_ptrs,
                               const int* ranks, const int* seg_starts, const int* seg_ends,
                               const int* seg_slots, int num_segments, int h_out) {
  const int s = blockIdx.x;
  if (s >= num_segments) return;
  const int slot = seg_slots[s];
  if (slot < 0) return;
  const int r = ranks[slot];
  const T* B = reinterpret_cast<const T*>(b_ptrs[slot]);
  if (r <= 0 || B == nullptr) return;
  const int end = seg_ends[s];
  for (int t0 = seg_starts[s] + blockIdx.z * LORA_TM; t0 < end; t0 += gridDim.z * LORA_TM) {
    expand_tile<T, LORA_TM>(v + (long long)t0 * ldv, ldv, min(LORA_TM, end - t0), B, r, h_out,
                            y + t0 * ldy, ldy);
  }
}

// Unmangled entry points, one set per element type: lora_{shrink,expand}_{token,segment}_{SUF}.
#define LORA_DEFINE_KERNELS(SUF, T)                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS) lora_shrink_token_##SUF(         \
      const T* x, long long ldx, float* v, int ldv, const long long* a_ptrs, const int* ranks,    \
      const int* token_slots, int num_tokens, int h_in, int k_chunk) {                            \
    shrink_token<T>(x, ldx, v, ldv, a_ptrs, ranks, token_slots, num_tokens, h_in, k_chunk);       \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS) lora_expand_token_##SUF(         \
      const float* v, int ldv, T* y, long long ldy, const long long* b_ptrs, const int* ranks,    \
      const int* token_slots, int num_tokens, int h_out) {                                        \
    expand_token<T>(v, ldv, y, ldy, b_ptrs, ranks, token_slots, num_tokens, h_out);               \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS) lora_shrink_segment_##SUF(       \
      const T* x, long long ldx, float* v, int ldv, const long long* a_ptrs, const int* ranks,    \
      const int* seg_starts, const int* seg_ends, const int* seg_slots, int num_segments,         \
      int h_in, int k_chunk) {                                                                    \
    shrink_segment<T>(x, ldx, v, ldv, a_ptrs, ranks, seg_starts, seg_ends, seg_slots,             \
                      num_segments, h_in, k_chunk);                                               \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(LORA_MAX_THREADS) lora_expand_segment_##SUF(       \
      const float* v, int ldv, T* y, long long ldy, const long long* b_ptrs, const int* ranks,    \
      const int* seg_starts, const int* seg_ends, const int* seg_slots, int num_segments,         \
      int h_out) {                                                                                \
    expand_segment<T>(v, ldv, y, ldy, b_ptrs, ranks, seg_starts, seg_ends, seg_slots,             \
                      num_segments, h_out);                                                       \
  }

LORA_DEFINE_KERNELS(f16, f16_t)
LORA_DEFINE_KERNELS(bf16, bf16_t)
LORA_DEFINE_KERNELS(f32, float)
