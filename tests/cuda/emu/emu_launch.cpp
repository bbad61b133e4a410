// C entry point of the CPU emulation: emu_launch(name, grid, block, params) with params laid out
// as for cuLaunchKernel (an array of pointers to each argument), so the tests drive the kernels
// through the same argument packing as the GPU path.
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_emu.h"
#include "lora_kernels.cu"  // -I multilora/cuda/data (tests/cuda/conftest.py)

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::barrier<>* emu_barrier = nullptr;
std::barrier<>** emu_warp_barriers = nullptr;
unsigned int emu_shuffle_slots[1024];

template <typename... A, std::size_t... I>
static void call(void (*k)(A...), void** p, std::index_sequence<I...>) {
  k(*static_cast<A*>(p[I])...);
}

template <typename... A>
static void run_grid(void (*k)(A...), dim3 grid, dim3 block, void** params) {
  gridDim = grid;
  blockDim = block;
  const unsigned int nthreads = block.x * block.y * block.z;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(nthreads);
        emu_barrier = &bar;
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        std::vector<std::barrier<>*> warp_ptrs;
        for (unsigned int w = 0; w * 32 < nthreads; ++w) {
          warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, nthreads - w * 32)));
          warp_ptrs.push_back(warps.back().get());
        }
        emu_warp_barriers = warp_ptrs.data();
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned int t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            blockIdx = dim3{bx, by, bz};
            threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            call(k, params, std::index_sequence_for<A...>{});
            bar.arrive_and_drop();
            warp_ptrs[t / 32]->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
      }
}

#define EMU_CASE(NAME) \
  if (std::strcmp(name, #NAME) == 0) return run_grid(NAME, grid, block, params), 0;
#define EMU_SUFFIX(SUF)               \
  EMU_CASE(lora_shrink_token_##SUF)   \
  EMU_CASE(lora_expand_token_##SUF)   \
  EMU_CASE(lora_shrink_segment_##SUF) \
  EMU_CASE(lora_expand_segment_##SUF) \
  EMU_CASE(paged_decode_##SUF)        \
  EMU_CASE(paged_reduce_##SUF)

extern "C" int emu_launch(const char* name, unsigned int gx, unsigned int gy, unsigned int gz,
                          unsigned int bx, unsigned int by, unsigned int bz, void** params) {
  const dim3 grid{gx, gy, gz}, block{bx, by, bz};
  EMU_SUFFIX(f16)
  EMU_SUFFIX(bf16)
  EMU_SUFFIX(f32)
  return 1;  // unknown kernel name
}
