// edgemamba CUDA kernels: selective scan (decode step = scan of one token) and causal conv step.
// The contract, layouts and error codes are in mamba_kernels.h; the NumPy reference of each op is
// edgemamba/kernels/reference.py.
//
// Work split of the scan: one "row" is one (batch, head, head_dim) channel, whose N state values
// stay in registers for the whole chunk. A row is served by `tpr` consecutive lanes of a warp
// (tpr = N/4 up to 32), each holding kChunks vectors of kVec contiguous state values, so that the
// state is read and written once, in coalesced 16-byte accesses, and y = state·C is a shuffle
// reduction across the row's lanes. Time runs sequentially inside the kernel (any chunk length
// works, nothing grows with T), with the next step's inputs loaded before the current step's math.

#include "mamba_kernels.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace {

constexpr int kBlock = 128;  // threads per block; a multiple of 32 so every warp is full for the shuffles
constexpr int64_t kMaxGridY = 65535;      // batch runs along the grid's y axis
constexpr int64_t kMaxRows = 1 << 26;     // per-batch index math is 32-bit: rows·32 lanes must fit

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return __float2half_rn(v);
  }
}

// kVec contiguous values from p as float; p is aligned to kVec elements when kVec == 4.
template <int kVec, typename T>
__device__ __forceinline__ void load_vec(const T *__restrict__ p, float (&out)[kVec]) {
  if constexpr (kVec == 4 && std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4 *>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else if constexpr (kVec == 4) {
    const uint2 raw = *reinterpret_cast<const uint2 *>(p);
    const float2 lo = __half22float2(*reinterpret_cast<const __half2 *>(&raw.x));
    const float2 hi = __half22float2(*reinterpret_cast<const __half2 *>(&raw.y));
    out[0] = lo.x, out[1] = lo.y, out[2] = hi.x, out[3] = hi.y;
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) out[v] = to_float(p[v]);
  }
}

template <int kVec>
__device__ __forceinline__ void store_vec(float *p, const float (&in)[kVec]) {
  if constexpr (kVec == 4) {
    *reinterpret_cast<float4 *>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) p[v] = in[v];
  }
}

// Fast exponentials: 2^v with one ex2.approx.ftz (a few ulp; results below 2^-126 flush to 0, which
// exp(Δ·A) ≤ 1 never needs). __expf is the same instruction plus a denormal fix-up of three
// dependent instructions, and exponentials sit on the decode step's critical path.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float exp2_ftz(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float fast_exp(float v) { return exp2_ftz(v * kLog2e); }
// log1pf keeps softplus accurate for small Δ.
__device__ __forceinline__ float softplus(float v) { return v > 20.f ? v : log1pf(fast_exp(v)); }
__device__ __forceinline__ float silu(float v) { return __fdividef(v, 1.f + fast_exp(-v)); }

struct ScanParams {
  const float *state_in;
  float *state_out;
  const void *x, *dt, *A, *B, *C, *D, *z, *dt_bias;
  void *y;
  int seqlen, rows, head_dim, heads_per_group, n_heads, n_groups, d_state;  // rows = H·P per batch entry
  int has_D, has_z, has_dt_bias;  // absent inputs point at a valid tensor and are masked, never branched on
  int dt_softplus;
  float dt_min, dt_max;
  int log2_tpr;  // lanes per row = 1 << log2_tpr
};

// One time step's inputs for one lane: its row's x, z, dt and its slice of B and C.
template <int kVec, int kChunks>
struct StepInputs {
  float x, z, dt;
  float B[kChunks][kVec], C[kChunks][kVec];
};

// Mamba-1 (kMamba1: one channel per head, P = G = 1, A per state value): grid (ceil(H·tpr / kBlock), batch).
// Mamba-2: grid (ceil(P·tpr / kBlock), H, batch), so head and batch come from the block index, not
// from divisions on the way to the first load. Every load is unconditional (masked lanes read a
// clamped, valid address and drop the value), so all of a lane's loads are in flight together: a
// branch around a load would cost a memory round trip of its own. kDecode: one token (T = 1 at
// compile time, straight-line code); otherwise step t+1's inputs load while step t computes.
template <typename TA, typename TW, int kVec, int kChunks, bool kMamba1, bool kDecode, int kTpr>
__global__ void __launch_bounds__(kBlock) selective_scan_kernel(const ScanParams p) {
  // Lanes per row: kTpr when known at compile time (the y reduction is then straight-line
  // shuffles, no loop and no branches), else from the parameters.
  const int tpr = kTpr ? kTpr : 1 << p.log2_tpr;
  const int tid = blockIdx.x * kBlock + threadIdx.x;
  const int lane = tid & (tpr - 1);
  const int sub = tid >> p.log2_tpr;  // Mamba-1: channel; Mamba-2: row within the head
  const int R = p.rows, N = p.d_state, T = kDecode ? 1 : p.seqlen, H = p.n_heads, G = p.n_groups;
  const int64_t b = kMamba1 ? blockIdx.y : blockIdx.z;
  const int h = kMamba1 ? min(sub, H - 1) : blockIdx.y;
  const int g = kMamba1 ? 0 : h / p.heads_per_group;
  const bool row_ok = sub < (kMamba1 ? H : p.head_dim);
  // Lanes past the last row still run (they take part in the shuffles) on a valid row, storing nothing.
  const int ri = kMamba1 ? h : h * p.head_dim + min(sub, p.head_dim - 1);  // row within the batch entry

  const TA *__restrict__ x = static_cast<const TA *>(p.x);
  const TA *__restrict__ dt = static_cast<const TA *>(p.dt);
  const TA *__restrict__ z = static_cast<const TA *>(p.z);
  const TA *__restrict__ B = static_cast<const TA *>(p.B);
  const TA *__restrict__ C = static_cast<const TA *>(p.C);
  const TW *__restrict__ A = static_cast<const TW *>(p.A);
  TA *__restrict__ y = static_cast<TA *>(p.y);

  const float dt_bias_v = to_float(static_cast<const TW *>(p.dt_bias)[p.has_dt_bias ? h : 0]);
  const float D_v = to_float(static_cast<const TW *>(p.D)[p.has_D ? h : 0]);
  const float dt_bias = p.has_dt_bias ? dt_bias_v : 0.f, D = p.has_D ? D_v : 0.f;  // selects, not branches

  // This lane's state values: chunk c holds state[n0 .. n0+kVec) with n0 = (lane + c·tpr)·kVec.
  int n0[kChunks];
  bool ok[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int n = (lane + c * tpr) * kVec;
    ok[c] = n < N;
    n0[c] = ok[c] ? n : 0;
  }
  const int64_t state_row = (b * R + ri) * N;
  // Masked chunks hold finite garbage that is never stored and never reaches y (selects, not products).
  float s[kChunks][kVec], a[kChunks][kVec];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    load_vec<kVec>(p.state_in + state_row + n0[c], s[c]);
    if constexpr (kMamba1) load_vec<kVec>(A + int64_t(h) * N + n0[c], a[c]);
  }
  const float a_head = kMamba1 ? 0.f : to_float(A[h]);  // Mamba-2: one A per head

  auto load_step = [&](int t, StepInputs<kVec, kChunks> &in) {
    const int64_t bt = b * T + t;
    in.x = to_float(x[bt * R + ri]);
    in.z = to_float(z[p.has_z ? bt * R + ri : 0]);
    in.dt = to_float(dt[bt * H + h]);
    const int64_t bc = (bt * G + g) * N;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      load_vec<kVec>(B + bc + n0[c], in.B[c]);
      load_vec<kVec>(C + bc + n0[c], in.C[c]);
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {  // a masked chunk's C is 0: its (finite) garbage state adds nothing to y
#pragma unroll
      for (int v = 0; v < kVec; ++v) in.C[c][v] = ok[c] ? in.C[c][v] : 0.f;
    }
  };

  StepInputs<kVec, kChunks> cur;
  [[maybe_unused]] StepInputs<kVec, kChunks> next;
  load_step(0, cur);
#pragma unroll 1
  for (int t = 0; t < T; ++t) {
    if constexpr (!kDecode) {
      if (t + 1 < T) load_step(t + 1, next);  // in flight while this step computes
    }

    float delta = cur.dt + dt_bias;
    delta = p.dt_softplus ? softplus(delta) : delta;
    delta = fminf(fmaxf(delta, p.dt_min), p.dt_max);
    const float dx = delta * cur.x;
    // What y needs besides state·C, computed while the state update and the reduction are pending,
    // so that after the last shuffle only one multiply-add and the store remain.
    const float skip = D * cur.x;
    const float gate = p.has_z ? silu(cur.z) : 1.f;
    const float delta2 = delta * kLog2e;  // exp(Δ·a) = 2^(Δ·log2e·a): one multiply on the critical path
    const float dA_head = kMamba1 ? 0.f : exp2_ftz(delta2 * a_head);
    float part[kVec];  // per-vector-slot partial sums: kVec independent chains, not one
#pragma unroll
    for (int v = 0; v < kVec; ++v) part[v] = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const float dA = kMamba1 ? exp2_ftz(delta2 * a[c][v]) : dA_head;
        s[c][v] = dA * s[c][v] + dx * cur.B[c][v];
        part[v] += s[c][v] * cur.C[c][v];
      }
    }
    float acc;
    if constexpr (kVec == 4) {
      acc = (part[0] + part[1]) + (part[2] + part[3]);  // a tree: two dependent adds, not three
    } else {
      acc = part[0];
#pragma unroll
      for (int v = 1; v < kVec; ++v) acc += part[v];
    }
    if (t + 1 == T && row_ok) {  // the final state leaves before the reduction, overlapping it
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (ok[c]) store_vec<kVec>(p.state_out + state_row + n0[c], s[c]);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      if (offset < tpr) acc += __shfl_xor_sync(0xffffffffu, acc, offset);  // uniform condition
    }

    if (lane == 0 && row_ok) {
      y[(b * T + t) * R + ri] = from_float<TA>((acc + skip) * gate);
    }
    if constexpr (!kDecode) {
      if (t + 1 < T) cur = next;
    }
  }
}

struct ConvParams {
  const void *x;
  const float *state_in;
  float *state_out;
  const void *weight, *bias;
  void *y;
  int channels, width, has_bias, silu;
};

// Grid: (ceil(channels / kBlock), batch); one thread per (batch, channel). kWidth = 0: the width is
// read from the parameters.
template <typename TA, typename TW, int kWidth>
__global__ void __launch_bounds__(kBlock) causal_conv1d_step_kernel(const ConvParams p) {
  const int c = blockIdx.x * kBlock + threadIdx.x;
  if (c >= p.channels) return;
  const int64_t i = int64_t(blockIdx.y) * p.channels + c;  // b·C + c
  const int K = kWidth ? kWidth : p.width;
  // No __restrict__ on the state: state_out may be state_in, and every read of index k+1 happens
  // before the write of index k, so the shift is safe in place.
  const float *past = p.state_in + i * (K - 1);
  float *present = p.state_out + i * (K - 1);
  const TW *__restrict__ w = static_cast<const TW *>(p.weight) + int64_t(c) * K;
  const float xv = to_float(static_cast<const TA *>(p.x)[i]);
  const float bias = to_float(static_cast<const TW *>(p.bias)[p.has_bias ? c : 0]);

  float acc = p.has_bias ? bias : 0.f;
#pragma unroll
  for (int k = 0; k < K - 1; ++k) acc += past[k] * to_float(w[k]);
  acc += xv * to_float(w[K - 1]);
#pragma unroll
  for (int k = 0; k < K - 2; ++k) present[k] = past[k + 1];
  present[K - 2] = xv;
  static_cast<TA *>(p.y)[i] = from_float<TA>(p.silu ? silu(acc) : acc);
}

bool aligned(const void *ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

int launch_status() { return static_cast<int>(cudaGetLastError()); }

int blocks_for(int64_t threads) { return static_cast<int>((threads + kBlock - 1) / kBlock); }

template <typename TA, typename TW, int kVec, int kChunks, bool kMamba1>
void launch_scan(const ScanParams &p, int batch, bool decode, cudaStream_t stream) {
  const int64_t lanes = int64_t(kMamba1 ? p.n_heads : p.head_dim) << p.log2_tpr;
  const dim3 grid = kMamba1 ? dim3(blocks_for(lanes), batch) : dim3(blocks_for(lanes), p.n_heads, batch);
  // Several 16-byte chunks per lane means a full warp per row (32 lanes), whatever N. One chunk:
  // the decode step of the released models (N = 16: 4 lanes, N = 64: 16, N = 128: 32) gets the
  // lane count at compile time; the other cases (and the scalar path) read it from the parameters.
  constexpr int kFull = kVec == 4 && kChunks > 1 ? 32 : 0;
  if (!decode) {
    selective_scan_kernel<TA, TW, kVec, kChunks, kMamba1, false, kFull><<<grid, kBlock, 0, stream>>>(p);
    return;
  }
  if constexpr (kVec == 4 && kChunks == 1) {
    switch (p.log2_tpr) {
      case 2: selective_scan_kernel<TA, TW, kVec, kChunks, kMamba1, true, 4><<<grid, kBlock, 0, stream>>>(p); return;
      case 3: selective_scan_kernel<TA, TW, kVec, kChunks, kMamba1, true, 8><<<grid, kBlock, 0, stream>>>(p); return;
      case 4: selective_scan_kernel<TA, TW, kVec, kChunks, kMamba1, true, 16><<<grid, kBlock, 0, stream>>>(p); return;
      case 5: selective_scan_kernel<TA, TW, kVec, kChunks, kMamba1, true, 32><<<grid, kBlock, 0, stream>>>(p); return;
      default: break;
    }
  }
  selective_scan_kernel<TA, TW, kVec, kChunks, kMamba1, true, kFull><<<grid, kBlock, 0, stream>>>(p);
}

template <typename TA, typename TW, int kVec, int kChunks>
int launch_scan_arch(const ScanParams &p, int batch, bool mamba1, bool decode, cudaStream_t stream) {
  if (mamba1) {
    launch_scan<TA, TW, kVec, kChunks, true>(p, batch, decode, stream);
  } else {
    launch_scan<TA, TW, kVec, kChunks, false>(p, batch, decode, stream);
  }
  return launch_status();
}

template <typename TA, typename TW>
int launch_scan_typed(ScanParams p, int batch, bool mamba1, bool decode, cudaStream_t stream) {
  const int N = p.d_state;
  const int e = sizeof(TA), w = sizeof(TW);
  // 16-byte state accesses need N % 4 == 0 and aligned pointers. Otherwise one value per access,
  // 8 per lane (N <= 256): a fallback for shapes no released model has.
  const bool vec4 = N % 4 == 0 && aligned(p.state_in, 16) && aligned(p.state_out, 16) && aligned(p.B, 4 * e) &&
                    aligned(p.C, 4 * e) && (!mamba1 || aligned(p.A, 4 * w));
  const int per_lane = vec4 ? 4 : 8;
  const int n_lanes = (N + per_lane - 1) / per_lane;
  int log2_tpr = 0;
  while ((1 << log2_tpr) < n_lanes && log2_tpr < 5) ++log2_tpr;
  p.log2_tpr = log2_tpr;
  const int chunks_needed = (n_lanes + (1 << log2_tpr) - 1) >> log2_tpr;
  if (!vec4) {
    if (chunks_needed > 1) return EM_ERR_D_STATE;
    return launch_scan_arch<TA, TW, 1, 8>(p, batch, mamba1, decode, stream);
  }
  switch (chunks_needed) {
    case 1: return launch_scan_arch<TA, TW, 4, 1>(p, batch, mamba1, decode, stream);
    case 2: return launch_scan_arch<TA, TW, 4, 2>(p, batch, mamba1, decode, stream);
    case 3:
    case 4: return launch_scan_arch<TA, TW, 4, 4>(p, batch, mamba1, decode, stream);
    case 5: case 6: case 7:
    case 8: return launch_scan_arch<TA, TW, 4, 8>(p, batch, mamba1, decode, stream);
    default: return EM_ERR_D_STATE;
  }
}

// Weights (A, D, dt_bias, conv weight and bias) are float32 or the activations' dtype.
template <template <typename, typename> class Fn, typename... Args>
int dispatch_dtypes(int act_dtype, int weight_dtype, Args &&...args) {
  if (act_dtype == EM_FLOAT32 && weight_dtype == EM_FLOAT32) return Fn<float, float>::run(args...);
  if (act_dtype == EM_FLOAT16 && weight_dtype == EM_FLOAT32) return Fn<__half, float>::run(args...);
  if (act_dtype == EM_FLOAT16 && weight_dtype == EM_FLOAT16) return Fn<__half, __half>::run(args...);
  return EM_ERR_DTYPE;
}

template <typename TA, typename TW>
struct ScanLauncher {
  static int run(const ScanParams &p, int batch, bool mamba1, bool decode, cudaStream_t stream) {
    return launch_scan_typed<TA, TW>(p, batch, mamba1, decode, stream);
  }
};

template <typename TA, typename TW>
struct ConvLauncher {
  static int run(const ConvParams &p, int batch, cudaStream_t stream) {
    const dim3 grid(blocks_for(p.channels), batch);
    if (p.width == 4) {
      causal_conv1d_step_kernel<TA, TW, 4><<<grid, kBlock, 0, stream>>>(p);
    } else {
      causal_conv1d_step_kernel<TA, TW, 0><<<grid, kBlock, 0, stream>>>(p);
    }
    return launch_status();
  }
};

}  // namespace

extern "C" {

int em_abi_version(void) { return EM_ABI_VERSION; }

const char *em_error_string(int code) {
  switch (code) {
    case EM_OK: return "ok";
    case EM_ERR_SHAPE: return "invalid shape: sizes must be positive and n_heads a multiple of n_groups";
    case EM_ERR_DTYPE: return "unsupported dtype combination (activations float32|float16, weights float32 or as activations)";
    case EM_ERR_D_STATE: return "d_state too large (at most 1024, or 256 when not a multiple of 4)";
    case EM_ERR_NULL: return "a required tensor pointer is NULL";
    case EM_ERR_CONV_WIDTH: return "conv width must be between 2 and 64";
    case EM_ERR_SIZE: return "too large: batch at most 65535, H·P, channels and seqlen at most 2^26";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown edgemamba kernel error";
  }
}

// Shared by the two entry points; a chunk of one token takes the decode-step kernel.
static int selective_scan(const float *state_in, float *state_out, const void *x, const void *dt, const void *A,
                          const void *B, const void *C, const void *D, const void *z, const void *dt_bias, void *y,
                          int64_t batch, int64_t seqlen, int64_t n_heads, int64_t head_dim, int64_t n_groups,
                          int64_t d_state, int a_per_state, int dt_softplus, float dt_min, float dt_max,
                          int act_dtype, int weight_dtype, void *stream) {
  if (batch < 1 || seqlen < 1 || n_heads < 1 || head_dim < 1 || n_groups < 1 || d_state < 1 ||
      n_heads % n_groups != 0)
    return EM_ERR_SHAPE;
  if (a_per_state && (head_dim != 1 || n_groups != 1)) return EM_ERR_SHAPE;
  if (batch > kMaxGridY || (!a_per_state && n_heads > kMaxGridY) || n_heads * head_dim > kMaxRows ||
      seqlen > kMaxRows)
    return EM_ERR_SIZE;
  if (d_state > 1024) return EM_ERR_D_STATE;
  if (!state_in || !state_out || !x || !dt || !A || !B || !C || !y) return EM_ERR_NULL;
  ScanParams p{};
  p.state_in = state_in, p.state_out = state_out, p.x = x, p.dt = dt, p.A = A, p.B = B, p.C = C, p.y = y;
  // An absent input points at a tensor that is there (never read for its value) and is masked off.
  p.D = D ? D : state_in, p.dt_bias = dt_bias ? dt_bias : state_in, p.z = z ? z : x;
  p.has_D = D != nullptr, p.has_dt_bias = dt_bias != nullptr, p.has_z = z != nullptr;
  p.seqlen = int(seqlen), p.rows = int(n_heads * head_dim), p.head_dim = int(head_dim);
  p.heads_per_group = int(n_heads / n_groups), p.n_heads = int(n_heads), p.n_groups = int(n_groups);
  p.d_state = int(d_state), p.dt_softplus = dt_softplus, p.dt_min = dt_min, p.dt_max = dt_max;
  return dispatch_dtypes<ScanLauncher>(act_dtype, weight_dtype, p, int(batch), a_per_state != 0, seqlen == 1,
                                       static_cast<cudaStream_t>(stream));
}

int em_selective_scan(const float *state_in, float *state_out, const void *x, const void *dt, const void *A,
                      const void *B, const void *C, const void *D, const void *z, const void *dt_bias, void *y,
                      int64_t batch, int64_t seqlen, int64_t n_heads, int64_t head_dim, int64_t n_groups,
                      int64_t d_state, int a_per_state, int dt_softplus, float dt_min, float dt_max, int act_dtype,
                      int weight_dtype, void *stream) {
  return selective_scan(state_in, state_out, x, dt, A, B, C, D, z, dt_bias, y, batch, seqlen, n_heads, head_dim,
                        n_groups, d_state, a_per_state, dt_softplus, dt_min, dt_max, act_dtype, weight_dtype, stream);
}

int em_selective_state_update(const float *state_in, float *state_out, const void *x, const void *dt,
                              const void *A, const void *B, const void *C, const void *D, const void *z,
                              const void *dt_bias, void *y, int64_t batch, int64_t n_heads, int64_t head_dim,
                              int64_t n_groups, int64_t d_state, int a_per_state, int dt_softplus, float dt_min,
                              float dt_max, int act_dtype, int weight_dtype, void *stream) {
  // The decode step is the scan of one token: (b, H, P) is (b, 1, H, P) in memory.
  return selective_scan(state_in, state_out, x, dt, A, B, C, D, z, dt_bias, y, batch, 1, n_heads, head_dim,
                        n_groups, d_state, a_per_state, dt_softplus, dt_min, dt_max, act_dtype, weight_dtype, stream);
}

int em_causal_conv1d_step(const void *x, const float *conv_state_in, float *conv_state_out, const void *weight,
                          const void *bias, void *y, int64_t batch, int64_t channels, int64_t width, int silu,
                          int act_dtype, int weight_dtype, void *stream) {
  if (batch < 1 || channels < 1) return EM_ERR_SHAPE;
  if (width < 2 || width > 64) return EM_ERR_CONV_WIDTH;
  if (batch > kMaxGridY || channels > kMaxRows) return EM_ERR_SIZE;
  if (!x || !conv_state_in || !conv_state_out || !weight || !y) return EM_ERR_NULL;
  ConvParams p{x, conv_state_in, conv_state_out, weight, bias ? bias : weight, y, int(channels), int(width),
               bias != nullptr, silu};
  return dispatch_dtypes<ConvLauncher>(act_dtype, weight_dtype, p, int(batch), static_cast<cudaStream_t>(stream));
}

}  // extern "C"
