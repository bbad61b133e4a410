// Just enough of CUDA to run lora_kernels.cu (backend_src/multilora/cuda/data/) on the CPU,
// for tests on machines without a GPU.
//
// emu_launch.cpp runs a grid one block at a time; each CUDA thread of the block is a std::thread,
// __syncthreads is a std::barrier, __shared__ is a function-static (one block lives at a time).
// A thread that returns drops out of the barriers, as an exited GPU thread does. Warp shuffles
// go through a per-warp exchange buffer between two waits on the warp's own barrier (blocks are
// 1-D, as all our launches are).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>

#define LORA_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };

extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
extern std::barrier<>* emu_barrier;
extern std::barrier<>** emu_warp_barriers;  // [blockDim.x / 32 rounded up]
extern unsigned int emu_shuffle_slots[1024];  // one per thread of the block

using std::max;
using std::min;

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

// __shfl_xor_sync on 4-byte values; every lane of the warp must call it, as on the GPU.
template <typename T>
inline T __shfl_xor_sync(unsigned int, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "the emulation shuffles 4-byte values");
  const unsigned int t = threadIdx.x;
  std::barrier<>& warp = *emu_warp_barriers[t / 32];
  std::memcpy(&emu_shuffle_slots[t], &v, 4);
  warp.arrive_and_wait();
  T r;
  std::memcpy(&r, &emu_shuffle_slots[t ^ (unsigned int)lane_mask], 4);
  warp.arrive_and_wait();  // nobody overwrites its slot before every lane has read
  return r;
}

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

// fp16 conversions by the compiler's _Float16 (IEEE binary16, round to nearest even), which is
// what cvt.f32.f16 / cvt.rn.f16.f32 do on the GPU.
inline float lora_f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short lora_f32_to_f16(float f) {
  _Float16 v = (_Float16)f;
  unsigned short h;
  std::memcpy(&h, &v, 2);
  return h;
}
