// kernels.cu: weight-only int8 / int4 matmul on CUDA, y = x W^T, for quantize.py's QuantLinear layers.
//
// cuda_kernels.py builds this file on first use (torch.utils.cpp_extension.load), checks what goes in, and holds the
// PyTorch twin of every kernel here (gemv_ref, dequantize_ref): what runs without CUDA, and what the tests hold
// these kernels to.
//
//   gemv        y (M, N) = x (M, K) W^T for 1 <= M <= 16 rows (decoding): W read once, dequantised in registers,
//               fp32 accumulation, fp16 / bf16 in and out.
//   dequantize  W (N, K) in fp16, bf16 or fp32. More than 16 rows (prefill, training) multiply the dequantised W
//               with cuBLAS: there the product is compute-bound and tensor cores win; one pass over W costs
//               what reading it costs (cuda_kernels.py's int_matmul makes that choice).
//
// The weights stay in quantize.py's packed layout (its docstring), unchanged. A linear of N outputs and K inputs,
// b bits, groups of g inputs:
//   qweight uint8 (N, K*b/8): row n holds W[n, :]'s codes in column order, little-endian: for b = 4 byte k holds
//           column 2k in its low nibble and 2k+1 in its high nibble; for b = 8 one code per byte
//   scales  fp16 (N, K/g), zeros uint8 (N, K/g):  W[n, k] = (code[n, k] - zeros[n, k/g]) * scales[n, k/g]
//
// Why not Marlin's order. Marlin shuffles int4 weights into the order of tensor-core fragments, because it feeds
// mma instructions. At 1-16 activation rows the product is a matrix-vector product in disguise: each weight is
// read once from HBM and used in M fused multiply-adds, and fp32 FMA units keep up with HBM (the count below), so
// this kernel uses no tensor cores and needs no fragment order. What it needs is contiguous bytes along a row, and
// the layout has them: the 32 lanes of a warp read 32 x 16 = 512 consecutive bytes of one row at once.
//
// The count, one activation row, H200 (4.8 TB/s HBM, ~67 TFLOP/s fp32 FMA): int4 weights arrive at 9.6e12 a
// second; each costs one FMA per row, one FADD and one FMUL to dequantise (plus the integer shift-and-mask):
// ~30 TFLOP/s at M = 1, under the FMA rate, so one row runs at memory speed. The FMA work grows with M, and near
// M = 8 the arithmetic, not HBM, sets the pace; bf16's matmul still reads 4x the bytes there.
//
// Layout of the work (gemv): a block of 4 warps owns 16 output features, 4 per warp (2 per warp from 8 activation
// rows on, for registers). The activations are staged in shared memory one tile of K at a time (1,024 columns for
// int4, 512 for int8: 32 lanes x one 16-byte load of codes each), so each is read from global memory once per block
// and from shared memory once per 4 (or 2) features. Each lane reads one 16-byte load of codes per feature per tile,
// and the next tile's loads are issued before this tile's arithmetic, so they are in flight while it runs. The
// warp's 32 partial sums meet in a shuffle reduction.
//
// Requirements (cuda_kernels.py checks them with clear messages; the host functions below check again): K a multiple
// of the group size, the group size a multiple of the codes in one 16-byte load (32 for int4, 16 for int8, so each
// load lies within one group), every tensor contiguous, on the current device, 16-byte aligned.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int WARPS = 4;   // warps in a gemv block
constexpr int MAX_M = 16;  // activation rows the gemv kernel takes

// Output features a warp owns, for MT activation rows: 4 (each activation read from shared memory serves 4), but 2
// from 8 rows on, where 4 x MT accumulators and the dequantised codes would no longer fit in 255 registers.
__host__ __device__ constexpr int rows_per_warp(int MT) { return MT >= 8 ? 2 : 4; }

// ---------------------------------------------------------------------------------------------------------------
// Conversions

// Two 16-bit activations packed in 32 bits -> two floats.
template <typename T> __device__ __forceinline__ float2 two_floats(uint32_t v);
template <> __device__ __forceinline__ float2 two_floats<__half>(uint32_t v) {
  __half2 h;
  memcpy(&h, &v, 4);
  return __half22float2(h);
}
template <> __device__ __forceinline__ float2 two_floats<__nv_bfloat16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));  // a bf16 is a float's top half
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

// Eight codes of the 16 bytes a lane loads (codes 8j .. 8j+7, j < 128 / BITS / 8) as floats code - zero, each in
// two instructions: the bits 0x4B000000 | c are the float 2^23 + c exactly (c < 2^23), so one FADD of
// -(2^23 + zero) gives c - zero exactly, with no integer-to-float conversion (a quarter-rate instruction).
// Code i of the load is column i: 32 / BITS codes per 32-bit word, from its low bits up (the layout above).
template <int BITS>
__device__ __forceinline__ void eight_codes(uint4 q, int j, float zero, float (&out)[8]) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  const float offset = 8388608.f + zero;  // 2^23 + zero, exact: zero < 256
#pragma unroll
  for (int e = 0; e < 8; e++) {
    const int i = j * 8 + e;  // a compile-time index once the callers' loops unroll: words stays in registers
    out[e] = __uint_as_float(0x4B000000u | ((words[i / PER_WORD] >> (BITS * (i % PER_WORD))) & MASK)) - offset;
  }
}

// Shared memory holds a tile of activations as 16-byte chunks of 8 values. Lane l reads chunks l*XC .. l*XC+XC-1
// (XC = 4 for int4, 2 for int8), so in one 16-byte read the 8 lanes the hardware serves together would hit the
// same banks 4 (or 2) times over. XOR-ing the chunk index with bits of its own higher part spreads them over all
// 32 banks; the staging writes use the same map, so the tile reads back in order.
template <int XC>
__device__ __forceinline__ int swizzle(int chunk) { return chunk ^ ((chunk >> 3) & (XC - 1)); }

// ---------------------------------------------------------------------------------------------------------------
// gemv: y (M, N) = x (M, K) W^T, 1 <= M <= MT <= 16, W packed (see the top of the file).

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(WARPS * 32)
gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const __half* __restrict__ scales,
            const uint8_t* __restrict__ zeros, T* __restrict__ y, int M, int N, int K, int group) {
  constexpr int CODES = 128 / BITS;  // codes in one 16-byte load: 32 (int4) or 16 (int8)
  constexpr int XC = CODES / 8;      // their activations, in 16-byte chunks of 8 values: 4 or 2
  constexpr int TILE = 32 * CODES;   // columns of K a warp covers in one step: 1,024 or 512
  constexpr int CHUNKS = TILE / 8;   // 16-byte chunks in one activation row of a tile
  constexpr int ROWS = rows_per_warp(MT);
  __shared__ uint4 xs[MT * CHUNKS];  // MT x 2 KB (int4) or MT x 1 KB (int8)

  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * WARPS + threadIdx.x / 32) * ROWS;  // this warp's first output feature
  const int G = K / group;
  const size_t row_bytes = (size_t)K * BITS / 8;

  // This lane's 16 bytes of codes for each of the warp's features, with their group's scale and zero. Outside W
  // (a feature past N, a column past K): zero codes and scale 0, which add nothing.
  auto load = [&](int k0, uint4 (&q)[ROWS], float (&s)[ROWS], float (&z)[ROWS]) {
    const int col = k0 + lane * CODES;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
      const int n = n0 + r;
      q[r] = make_uint4(0, 0, 0, 0);
      s[r] = 0.f;
      z[r] = 0.f;
      if (n < N && col < K) {
        q[r] = *reinterpret_cast<const uint4*>(qweight + n * row_bytes + (size_t)col * BITS / 8);
        s[r] = __half2float(scales[(size_t)n * G + col / group]);
        z[r] = zeros[(size_t)n * G + col / group];
      }
    }
  };

  float acc[ROWS][MT];
#pragma unroll
  for (int r = 0; r < ROWS; r++) {
#pragma unroll
    for (int m = 0; m < MT; m++) acc[r][m] = 0.f;
  }
  uint4 q[ROWS];
  float s[ROWS], z[ROWS];
  load(0, q, s, z);

  for (int k0 = 0; k0 < K; k0 += TILE) {
    // 1. The tile's activations into shared memory, rows past M and columns past K as zeros.
    __syncthreads();  // every warp is done with the previous tile
    for (int i = threadIdx.x; i < MT * CHUNKS; i += WARPS * 32) {
      const int m = i / CHUNKS, c = i % CHUNKS, col = k0 + c * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m < M && col < K) v = *reinterpret_cast<const uint4*>(x + (size_t)m * K + col);
      xs[m * CHUNKS + swizzle<XC>(c)] = v;
    }
    __syncthreads();

    // 2. The next tile's codes start loading now; they arrive while this tile's arithmetic runs.
    uint4 q_next[ROWS];
    float s_next[ROWS], z_next[ROWS];
    load(k0 + TILE, q_next, s_next, z_next);

    // 3. This lane's CODES columns, 8 at a time: dequantise 8 codes of each of the warp's features, then
    //    multiply-add them with the same 8 columns of every activation row (an activation chunk is read from
    //    shared memory once for ROWS features).
#pragma unroll
    for (int j = 0; j < XC; j++) {
      float w[ROWS][8];
#pragma unroll
      for (int r = 0; r < ROWS; r++) {
        eight_codes<BITS>(q[r], j, z[r], w[r]);
#pragma unroll
        for (int e = 0; e < 8; e++) w[r][e] *= s[r];  // exact: (code - zero) has 9 bits, an fp16 scale 11
      }
#pragma unroll
      for (int m = 0; m < MT; m++) {
        const uint4 v = xs[m * CHUNKS + swizzle<XC>(lane * XC + j)];
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int p = 0; p < 4; p++) {
          const float2 a = two_floats<T>(words[p]);
#pragma unroll
          for (int r = 0; r < ROWS; r++) {
            acc[r][m] = fmaf(w[r][2 * p], a.x, acc[r][m]);
            acc[r][m] = fmaf(w[r][2 * p + 1], a.y, acc[r][m]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
      q[r] = q_next[r];
      s[r] = s_next[r];
      z[r] = z_next[r];
    }
  }

  // 4. The warp's 32 partial sums of each (row, feature), added in a butterfly; lane 0 writes.
#pragma unroll
  for (int r = 0; r < ROWS; r++) {
#pragma unroll
    for (int m = 0; m < MT; m++) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0 && m < M && n0 + r < N) y[(size_t)m * N + n0 + r] = from_float<T>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dequantize: W (N, K) in T from the packed layout; one thread per 16-byte load of codes.

template <typename T, int BITS>
__global__ void dequantize_kernel(const uint8_t* __restrict__ qweight, const __half* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, T* __restrict__ w, int N, int K, int group) {
  constexpr int CODES = 128 / BITS;
  const size_t loads_per_row = K / CODES;
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)N * loads_per_row) return;
  const size_t n = i / loads_per_row;
  const int col = (int)(i % loads_per_row) * CODES;
  const size_t g = n * (K / group) + col / group;
  const uint4 q = reinterpret_cast<const uint4*>(qweight)[i];
  const float s = __half2float(scales[g]);
  // CODES values of T, 8 at a time: 16 bytes (fp16 / bf16) or 32 (fp32), written as 16-byte stores.
  uint4* out = reinterpret_cast<uint4*>(w + n * K + col);
  constexpr int PER_STORE = 16 / sizeof(T);
#pragma unroll
  for (int j = 0; j < CODES / 8; j++) {
    float v[8];
    eight_codes<BITS>(q, j, zeros[g], v);
    T t[8];
#pragma unroll
    for (int e = 0; e < 8; e++) t[e] = from_float<T>(v[e] * s);  // exact in fp32, then one rounding to T
#pragma unroll
    for (int h = 0; h < 8 / PER_STORE; h++) memcpy(&out[j * (8 / PER_STORE) + h], &t[h * PER_STORE], 16);
  }
}

}  // namespace

// Everything above also compiles with g++ (tests/kernels_on_host.cpp runs these kernels on CPU threads, the test
// suite's check of them on a machine without a GPU); what follows launches them, which only nvcc can compile.
#ifndef KERNELS_ON_HOST

// ---------------------------------------------------------------------------------------------------------------
// Launchers: plain CUDA, no PyTorch. They return the launch's error code.

namespace {

template <typename T, int BITS, int MT>
cudaError_t launch_gemv_rows(const void* x, const uint8_t* qweight, const __half* scales, const uint8_t* zeros,
                             void* y, int M, int N, int K, int group, cudaStream_t stream) {
  constexpr int FEATURES = WARPS * rows_per_warp(MT);  // output features a block owns
  gemv_kernel<T, BITS, MT><<<(N + FEATURES - 1) / FEATURES, WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), qweight, scales, zeros, static_cast<T*>(y), M, N, K, group);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_gemv(const void* x, const uint8_t* qweight, const __half* scales, const uint8_t* zeros, void* y,
                        int M, int N, int K, int group, cudaStream_t stream) {
  // The fewest activation rows a build holds that cover M: 5 builds per type and width, not 16.
  if (M <= 1) return launch_gemv_rows<T, BITS, 1>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  if (M <= 2) return launch_gemv_rows<T, BITS, 2>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  if (M <= 4) return launch_gemv_rows<T, BITS, 4>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  if (M <= 8) return launch_gemv_rows<T, BITS, 8>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  return launch_gemv_rows<T, BITS, 16>(x, qweight, scales, zeros, y, M, N, K, group, stream);
}

template <typename T, int BITS>
cudaError_t launch_dequantize(const uint8_t* qweight, const __half* scales, const uint8_t* zeros, void* w, int N,
                              int K, int group, cudaStream_t stream) {
  const size_t loads = (size_t)N * (K / (128 / BITS));
  const int block = 256;
  dequantize_kernel<T, BITS><<<(unsigned)((loads + block - 1) / block), block, 0, stream>>>(
      qweight, scales, zeros, static_cast<T*>(w), N, K, group);
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 fp16, 1 bf16, 2 fp32 (dequantize only). Returns the launch's cudaError_t.
extern "C" int pt_gemv(int dtype, int bits, const void* x, const uint8_t* qweight, const __half* scales,
                       const uint8_t* zeros, void* y, int M, int N, int K, int group, cudaStream_t stream) {
  if (dtype == 0 && bits == 4) return launch_gemv<__half, 4>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  if (dtype == 0 && bits == 8) return launch_gemv<__half, 8>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  if (dtype == 1 && bits == 4)
    return launch_gemv<__nv_bfloat16, 4>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  if (dtype == 1 && bits == 8)
    return launch_gemv<__nv_bfloat16, 8>(x, qweight, scales, zeros, y, M, N, K, group, stream);
  return cudaErrorInvalidValue;
}

extern "C" int pt_dequantize(int dtype, int bits, const uint8_t* qweight, const __half* scales, const uint8_t* zeros,
                             void* w, int N, int K, int group, cudaStream_t stream) {
  if (bits == 4) {
    if (dtype == 0) return launch_dequantize<__half, 4>(qweight, scales, zeros, w, N, K, group, stream);
    if (dtype == 1) return launch_dequantize<__nv_bfloat16, 4>(qweight, scales, zeros, w, N, K, group, stream);
    if (dtype == 2) return launch_dequantize<float, 4>(qweight, scales, zeros, w, N, K, group, stream);
  } else if (bits == 8) {
    if (dtype == 0) return launch_dequantize<__half, 8>(qweight, scales, zeros, w, N, K, group, stream);
    if (dtype == 1) return launch_dequantize<__nv_bfloat16, 8>(qweight, scales, zeros, w, N, K, group, stream);
    if (dtype == 2) return launch_dequantize<float, 8>(qweight, scales, zeros, w, N, K, group, stream);
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------------------
// The PyTorch host functions (compiled when torch.utils.cpp_extension builds this file, which defines
// TORCH_EXTENSION_NAME). They check what memory safety needs and launch on the stream cuda_kernels.py passes (the
// caller's current stream); cuda_kernels.py checks the same things first, with messages that name the layer.
#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

namespace {

int dtype_code(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kHalf) return 0;
  if (t.scalar_type() == torch::kBFloat16) return 1;
  if (t.scalar_type() == torch::kFloat) return 2;
  TORCH_CHECK(false, "kernels.cu: fp16, bf16 or fp32 expected, got ", t.scalar_type());
}

void check_tensor(const torch::Tensor& t, const char* name, int device, at::ScalarType dtype, int64_t rows,
                  int64_t cols) {
  TORCH_CHECK(t.is_cuda(), "kernels.cu: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.get_device() == device, "kernels.cu: ", name, " is on ", t.device(), ", not cuda:", device);
  TORCH_CHECK(t.scalar_type() == dtype, "kernels.cu: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "kernels.cu: ", name, " must be (", rows,
              ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "kernels.cu: ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "kernels.cu: ", name, " must be 16-byte aligned");
}

// The packed weight of N x K with bits and group: the checks both kernels need.
void check_packed(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t N,
                  int64_t K, int64_t bits, int64_t group, int device) {
  TORCH_CHECK(bits == 4 || bits == 8, "kernels.cu: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group > 0 && group % (128 / bits) == 0 && K % group == 0, "kernels.cu: group size ", group,
              " must be a multiple of ", 128 / bits, " that divides K = ", K);
  check_tensor(qweight, "qweight", device, torch::kByte, N, K * bits / 8);
  check_tensor(scales, "scales", device, torch::kHalf, N, K / group);
  check_tensor(zeros, "zeros", device, torch::kByte, N, K / group);
  int current = -1;
  cudaGetDevice(&current);
  TORCH_CHECK(current == device, "kernels.cu: the tensors are on cuda:", device, ", the current device is cuda:",
              current);
}

void gemv(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
          const torch::Tensor& zeros, torch::Tensor y, int64_t bits, int64_t group, int64_t stream) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= MAX_M, "kernels.cu: gemv takes 1 to ", MAX_M,
              " rows of activations, got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16,
              "kernels.cu: gemv takes fp16 or bf16 activations, got ", x.scalar_type());
  const int device = x.get_device();
  check_tensor(x, "x", device, x.scalar_type(), M, K);
  check_tensor(y, "y", device, x.scalar_type(), M, N);
  check_packed(qweight, scales, zeros, N, K, bits, group, device);
  const cudaError_t err = (cudaError_t)pt_gemv(dtype_code(x), bits, x.data_ptr(), qweight.data_ptr<uint8_t>(),
      reinterpret_cast<const __half*>(scales.data_ptr()), zeros.data_ptr<uint8_t>(), y.data_ptr(), M, N, K, group,
      reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "kernels.cu: gemv launch failed: ", cudaGetErrorString(err));
}

void dequantize(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& zeros,
                torch::Tensor w, int64_t bits, int64_t group, int64_t stream) {
  TORCH_CHECK(w.dim() == 2, "kernels.cu: w must be 2-D");
  const int64_t N = w.size(0), K = w.size(1);
  const int device = w.get_device();
  check_tensor(w, "w", device, w.scalar_type(), N, K);
  check_packed(qweight, scales, zeros, N, K, bits, group, device);
  const cudaError_t err = (cudaError_t)pt_dequantize(dtype_code(w), bits, qweight.data_ptr<uint8_t>(),
      reinterpret_cast<const __half*>(scales.data_ptr()), zeros.data_ptr<uint8_t>(), w.data_ptr(), N, K, group,
      reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "kernels.cu: dequantize launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y (M, N) = x (M, K) W^T, W packed int4 / int8, 1 <= M <= 16 (writes y)");
  m.def("dequantize", &dequantize, "W (N, K) from the packed layout, fp16 / bf16 / fp32 (writes w)");
}
#endif
#endif  // KERNELS_ON_HOST
