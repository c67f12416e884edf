// kernels_on_host.cpp: kernels.cu's kernels, the same source, compiled by g++ and run on CPU threads, so a machine
// without a GPU tests their indexing, masking, shared-memory swizzle, barriers and warp reduction
// (tests/test_kernels.py builds and loads this file: test_the_gemv_on_host_threads_equals_its_twin and the
// dequantize one).
//
// CUDA's execution model, emulated: a block's threads are std::threads (128 for the gemv), __syncthreads a barrier
// of all of them, __shfl_xor_sync an exchange through memory between two barriers of the warp's 32, __shared__
// arrays function-local statics (one block runs at a time), threadIdx / blockIdx thread-local. The CUDA headers
// compile under g++ (their fp16 / bf16 conversions have host versions); kernels.cu's launchers, which use the <<<>>>
// syntax, are left out by KERNELS_ON_HOST, and the two dispatches below mirror them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstring>
using std::fmaf;
#include <memory>
#include <thread>
#include <vector>

thread_local dim3 threadIdx, blockIdx, blockDim;
thread_local int t_thread;  // this thread's index in its block

struct Block {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;
  explicit Block(int threads) : all(threads), lanes(threads) {
    for (int w = 0; w < threads / 32; w++) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
};
static Block* g_block = nullptr;

inline void __syncthreads() { g_block->all.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const int warp = t_thread / 32, lane = t_thread % 32;
  g_block->lanes[t_thread] = v;
  g_block->warps[warp]->arrive_and_wait();
  const float other = g_block->lanes[warp * 32 + (lane ^ offset)];
  g_block->warps[warp]->arrive_and_wait();  // nobody overwrites a lane's value before its partner has read it
  return other;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define KERNELS_ON_HOST
#include "../kernels.cu"

// Runs kernel(args) over grid blocks of `threads` threads each, one block at a time.
template <typename F>
void run_grid(int grid, int threads, F kernel) {
  for (int b = 0; b < grid; b++) {
    Block block(threads);
    g_block = &block;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; t++)
      pool.emplace_back([&, b, t] {
        blockIdx = dim3(b);
        threadIdx = dim3(t);
        blockDim = dim3(threads);
        t_thread = t;
        kernel();
      });
    for (auto& th : pool) th.join();
  }
}

template <typename T, int BITS, int MT>
void host_gemv_rows(const void* x, const uint8_t* q, const __half* s, const uint8_t* z, void* y, int M, int N, int K,
                    int group) {
  constexpr int FEATURES = WARPS * rows_per_warp(MT);  // as launch_gemv_rows
  run_grid((N + FEATURES - 1) / FEATURES, WARPS * 32, [&] {
    gemv_kernel<T, BITS, MT>(static_cast<const T*>(x), q, s, z, static_cast<T*>(y), M, N, K, group);
  });
}

template <typename T, int BITS>
void host_gemv_typed(const void* x, const uint8_t* q, const __half* s, const uint8_t* z, void* y, int M, int N, int K,
                     int group) {  // as launch_gemv
  if (M <= 1) host_gemv_rows<T, BITS, 1>(x, q, s, z, y, M, N, K, group);
  else if (M <= 2) host_gemv_rows<T, BITS, 2>(x, q, s, z, y, M, N, K, group);
  else if (M <= 4) host_gemv_rows<T, BITS, 4>(x, q, s, z, y, M, N, K, group);
  else if (M <= 8) host_gemv_rows<T, BITS, 8>(x, q, s, z, y, M, N, K, group);
  else host_gemv_rows<T, BITS, 16>(x, q, s, z, y, M, N, K, group);
}

template <typename T, int BITS>
void host_dequantize_typed(const uint8_t* q, const __half* s, const uint8_t* z, void* w, int N, int K, int group) {
  const size_t loads = (size_t)N * (K / (128 / BITS));  // as launch_dequantize
  const int block = 256;
  run_grid((int)((loads + block - 1) / block), block, [&] {
    dequantize_kernel<T, BITS>(q, s, z, static_cast<T*>(w), N, K, group);
  });
}

// dtype: 0 fp16, 1 bf16, 2 fp32 (dequantize only), as kernels.cu's pt_gemv / pt_dequantize.
extern "C" void host_gemv(int dtype, int bits, const void* x, const uint8_t* q, const __half* s, const uint8_t* z,
                          void* y, int M, int N, int K, int group) {
  if (dtype == 0 && bits == 4) host_gemv_typed<__half, 4>(x, q, s, z, y, M, N, K, group);
  if (dtype == 0 && bits == 8) host_gemv_typed<__half, 8>(x, q, s, z, y, M, N, K, group);
  if (dtype == 1 && bits == 4) host_gemv_typed<__nv_bfloat16, 4>(x, q, s, z, y, M, N, K, group);
  if (dtype == 1 && bits == 8) host_gemv_typed<__nv_bfloat16, 8>(x, q, s, z, y, M, N, K, group);
}

extern "C" void host_dequantize(int dtype, int bits, const uint8_t* q, const __half* s, const uint8_t* z, void* w,
                                int N, int K, int group) {
  if (dtype == 0 && bits == 4) host_dequantize_typed<__half, 4>(q, s, z, w, N, K, group);
  if (dtype == 0 && bits == 8) host_dequantize_typed<__half, 8>(q, s, z, w, N, K, group);
  if (dtype == 1 && bits == 4) host_dequantize_typed<__nv_bfloat16, 4>(q, s, z, w, N, K, group);
  if (dtype == 1 && bits == 8) host_dequantize_typed<__nv_bfloat16, 8>(q, s, z, w, N, K, group);
  if (dtype == 2 && bits == 4) host_dequantize_typed<float, 4>(q, s, z, w, N, K, group);
  if (dtype == 2 && bits == 8) host_dequantize_typed<float, 8>(q, s, z, w, N, K, group);
}
