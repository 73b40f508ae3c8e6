// CUDA kernels of the locally connected 2-D FF layer (see local2d_cuda.h).
//
// Both kernels are shared-memory tiled matrix products per output location l, with the
// window walked through Window::entry exactly as the CPU kernels walk it:
//   forward: block (l, batch tile, unit tile), thread (image, unit); for each chunk of kTileT
//            valid window entries, stage x[images, entries] and weight[l, units, entries] in
//            shared memory, then acc += weight * x. Epilogue: bias, ReLU, store h.
//   update:  block (l, entry tile, unit tile), thread (entry, unit); for each chunk of kTileB
//            images, stage x[images, entries] and delta[units, images] (formed on the fly from h
//            and coef: the ReLU mask and goodness derivative fused), then acc += delta * x.
//            Epilogue: update_entry (grad accumulation or SGD) on the weight entry; the blocks
//            of entry tile 0 also reduce delta over the images for the bias.
#include "local2d_cuda.h"

namespace ff_kernels {
namespace cuda {
namespace {

constexpr int kTileB = 32;  // images per tile
constexpr int kTileO = 8;   // output units per tile
constexpr int kTileT = 32;  // window entries per tile
constexpr int kThreads = kTileB * kTileO;
static_assert(kTileT == kTileB, "kThreads is the block size of both kernels: (images or entries) x units");

// Input offset and block index of valid entries t0 .. t0 + kTileT - 1 (offset -1 past the end).
__device__ void stage_entries(const Window& w, int t0, int tid, int* offsets, int* blocks) {
  if (tid < kTileT) {
    const int t = t0 + tid;
    offsets[tid] = -1;
    blocks[tid] = 0;
    if (t < w.count()) {
      int c, di, dj;
      w.entry(t, c, di, dj);
      offsets[tid] = w.input_offset(c, di, dj);
      blocks[tid] = w.block_index(c, di, dj);
    }
  }
}

// xs[image][entry] = x[b0 + image, entry] for the staged entries, zero outside.
__device__ void stage_inputs(const float* x, const Local2dShape& s, int b0, int tid, const int* offsets,
                             float (*xs)[kTileT + 1]) {
  for (int e = tid; e < kTileB * kTileT; e += kThreads) {
    const int tt = e % kTileT, bb = e / kTileT;
    const int b = b0 + bb;
    xs[bb][tt] = (b < s.batch && offsets[tt] >= 0)
                     ? x[static_cast<int64_t>(b) * s.image_size() + offsets[tt]]
                     : 0.0f;
  }
}

__global__ void forward_kernel(const float* __restrict__ x, const float* __restrict__ weight,
                               const float* __restrict__ bias, ForwardEpilogue epilogue, float* __restrict__ h,
                               Local2dShape s) {
  __shared__ float xs[kTileB][kTileT + 1];  // [image][entry]
  __shared__ float ws[kTileO][kTileT + 1];  // [unit][entry]
  __shared__ int offsets[kTileT], blocks[kTileT];
  const int l = blockIdx.x, b0 = blockIdx.y * kTileB, o0 = blockIdx.z * kTileO;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileB + tx;
  const Window w = window_of(s, l);
  const int K = s.block_size();
  const int64_t unit0 = static_cast<int64_t>(l) * s.out_channels + o0;
  float acc = 0.0f;
  for (int t0 = 0; t0 < w.count(); t0 += kTileT) {
    stage_entries(w, t0, tid, offsets, blocks);
    __syncthreads();
    stage_inputs(x, s, b0, tid, offsets, xs);
    for (int e = tid; e < kTileO * kTileT; e += kThreads) {
      const int tt = e % kTileT, oo = e / kTileT;
      ws[oo][tt] = (o0 + oo < s.out_channels && offsets[tt] >= 0) ? weight[(unit0 + oo) * K + blocks[tt]] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int tt = 0; tt < kTileT; ++tt) acc += ws[ty][tt] * xs[tx][tt];
    __syncthreads();
  }
  const int b = b0 + tx, o = o0 + ty;
  if (b < s.batch && o < s.out_channels) {
    const float z = acc + (bias != nullptr ? bias[unit0 + ty] : 0.0f);
    const int64_t i = static_cast<int64_t>(b) * s.out_image_size() + static_cast<int64_t>(o) * s.locations() + l;
    h[i] = epilogue(z, i);
  }
}

__global__ void update_kernel(const float* __restrict__ x, const float* __restrict__ h,
                              const float* __restrict__ coef, Goodness kind, UpdateTarget u, Local2dShape s) {
  __shared__ float xs[kTileB][kTileT + 1];  // [image][entry]
  __shared__ float ds[kTileO][kTileB + 1];  // [unit][image]
  __shared__ int offsets[kTileT], blocks[kTileT];
  const int l = blockIdx.x, t0 = blockIdx.y * kTileT, o0 = blockIdx.z * kTileO;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileB + tx;
  const Window w = window_of(s, l);
  const bool bias_tile = blockIdx.y == 0;  // entry tile 0 also reduces the bias gradient
  if (t0 >= w.count() && !bias_tile) return;  // uniform over the block: an edge window with fewer entries
  stage_entries(w, t0, tid, offsets, blocks);
  const int64_t L = s.locations(), unit0 = static_cast<int64_t>(l) * s.out_channels + o0;
  float acc = 0.0f, bias_acc = 0.0f;
  for (int b0 = 0; b0 < s.batch; b0 += kTileB) {
    __syncthreads();
    stage_inputs(x, s, b0, tid, offsets, xs);
    for (int e = tid; e < kTileO * kTileB; e += kThreads) {
      const int bb = e % kTileB, oo = e / kTileB;
      const int b = b0 + bb, o = o0 + oo;
      ds[oo][bb] = (b < s.batch && o < s.out_channels)
                       ? goodness_delta(kind, coef[b], h[static_cast<int64_t>(b) * s.out_image_size() + o * L + l])
                       : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int bb = 0; bb < kTileB; ++bb) acc += ds[ty][bb] * xs[bb][tx];
    if (bias_tile && tx == 0)
      for (int bb = 0; bb < kTileB; ++bb) bias_acc += ds[ty][bb];
  }
  __syncthreads();  // offsets / blocks were written before the loop, which may not have run
  const int o = o0 + ty;
  if (o >= s.out_channels) return;
  if (offsets[tx] >= 0) {
    const int64_t i = (unit0 + ty) * s.block_size() + blocks[tx];
    update_entry(u, u.weight + i, u.weight_buf != nullptr ? u.weight_buf + i : nullptr, acc);
  }
  if (bias_tile && tx == 0 && u.bias != nullptr) {
    const int64_t i = unit0 + ty;
    update_entry(u, u.bias + i, u.bias_buf != nullptr ? u.bias_buf + i : nullptr, bias_acc);
  }
}

int ceil_div(int n, int d) { return (n + d - 1) / d; }

}  // namespace

cudaError_t local2d_forward(const float* x, const float* weight, const float* bias, const ForwardEpilogue& epilogue,
                            float* h, const Local2dShape& s, cudaStream_t stream) {
  if (s.batch == 0 || s.out_channels == 0 || s.locations() == 0) return cudaSuccess;
  const dim3 grid(s.locations(), ceil_div(s.batch, kTileB), ceil_div(s.out_channels, kTileO));
  forward_kernel<<<grid, dim3(kTileB, kTileO), 0, stream>>>(x, weight, bias, epilogue, h, s);
  return cudaGetLastError();
}

cudaError_t local2d_update(const float* x, const float* h, const float* coef, Goodness kind,
                           const UpdateTarget& target, const Local2dShape& s, cudaStream_t stream) {
  if (s.out_channels == 0 || s.locations() == 0) return cudaSuccess;
  const dim3 grid(s.locations(), ceil_div(s.block_size(), kTileT), ceil_div(s.out_channels, kTileO));
  update_kernel<<<grid, dim3(kTileT, kTileO), 0, stream>>>(x, h, coef, kind, target, s);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ff_kernels
