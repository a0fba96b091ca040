// Throughput of the exp2 instruction forms on the GPU: float32 `ex2.approx.ftz.f32` against the packed
// `ex2.approx.ftz.bf16x2` and `ex2.approx.f16x2` (two exponentials per instruction), 8 independent chains per thread.
// It asks whether packed exponentials raise the exp-unit ceiling of the attention kernels (issue 7).
//
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -o exp2_packed benchmarks/exp2_packed.cu && ./exp2_packed
//   cuobjdump -sass exp2_packed | grep -oE "MUFU\.[A-Z0-9_.]*" | sort | uniq -c    # the instructions they become
#include <cstdio>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float ex2_f32(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ unsigned ex2_bf16x2(unsigned x) {
  unsigned y;
  asm volatile("ex2.approx.ftz.bf16x2 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ unsigned ex2_f16x2(unsigned x) {
  unsigned y;
  asm volatile("ex2.approx.f16x2 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// kMode 0: float32, 1: bf16x2, 2: f16x2. Each step feeds the result back (negated: the values stay in range).
template <int kMode>
__global__ void exp2_chains(float* out, int iters) {
  float a[8];
  unsigned b[8];
  for (int i = 0; i < 8; i++) {
    a[i] = -(threadIdx.x % 7) * 0.01f - i * 0.001f;
    b[i] = 0xBC00BC00u + i;
  }
  for (int it = 0; it < iters; it++) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
      if (kMode == 0) a[i] = ex2_f32(a[i]) - 1.0f;
      else if (kMode == 1) b[i] = ex2_bf16x2(b[i]) ^ 0x80008000u;
      else b[i] = ex2_f16x2(b[i]) ^ 0x80008000u;
    }
  }
  float s = 0;
  for (int i = 0; i < 8; i++) s += a[i] + b[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;  // keeps the chains alive
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* out = nullptr;
  cudaMalloc(&out, sizeof(float) * sms * 8 * 256);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const int iters = 4096;
  const char* names[] = {"f32", "bf16x2", "f16x2"};
  for (int mode = 0; mode < 3; mode++) {
    for (int rep = 0; rep < 2; rep++) {  // the first run warms up
      cudaEventRecord(e0);
      if (mode == 0) exp2_chains<0><<<sms * 8, 256>>>(out, iters);
      if (mode == 1) exp2_chains<1><<<sms * 8, 256>>>(out, iters);
      if (mode == 2) exp2_chains<2><<<sms * 8, 256>>>(out, iters);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      const double lanes = double(sms) * 8 * 256 * iters * 8;  // instructions x lanes
      const double exps = lanes * (mode == 0 ? 1 : 2);
      if (rep) {
        printf("mode %d (%s): %.3f ms, %.2f T instr-lanes/s, %.2f T exps/s\n", mode, names[mode], ms,
               lanes / ms / 1e9, exps / ms / 1e9);
      }
    }
  }
  cudaFree(out);
  return 0;
}
