/* edgemamba CUDA kernels for Mamba decode and prefill: the C ABI.
 *
 * One launcher per fused op of the contract (ops in ONNX domain "edgemamba"):
 *   SelectiveStateUpdate  -> em_selective_state_update   (decode step, Mamba-1 and Mamba-2)
 *   SelectiveScan         -> em_selective_scan           (prefill over a chunk of T tokens)
 *   CausalConv1dStep      -> em_causal_conv1d_step       (decode step of the depthwise causal conv)
 * Plain C types only, so ctypes/cupy and the TensorRT plugins call the same entry points.
 *
 * Layout: every tensor contiguous, row-major. Mamba-1 is passed as Mamba-2 with one channel per head:
 * n_heads = d_inner, head_dim = 1, n_groups = 1, a_per_state = 1 (A is (d_inner, d_state));
 * a_per_state requires head_dim = 1 and n_groups = 1.
 *
 *   state_in, state_out   (b, H, P, N)    float32   (Mamba-1: (b, d_inner, N))
 *   x, z, y               (b, T, H, P)    act dtype (T = 1 for the decode step: (b, H, P))
 *   dt                    (b, T, H)       act dtype
 *   B, C                  (b, T, G, N)    act dtype; head h reads group h / (H / G)
 *   A                     (H, N) if a_per_state else (H)     weight dtype
 *   D, dt_bias            (H)                                weight dtype; NULL = absent
 *   z                     NULL = no gating
 *
 *   Δ = clamp(softplus(dt + dt_bias), dt_min, dt_max)   (softplus only if dt_softplus; softplus(v) = v for v > 20)
 *   state' = exp(Δ·A)·state + (Δ·x)⊗B;   y = state'·C + D·x;   y = y·silu(z) if z
 * All arithmetic in float32. state_out may equal state_in: the state is then updated in place.
 *
 * Every launcher returns 0 on success, a positive CUDA error code if the launch failed, or a
 * negative EM_ERR_* code for invalid arguments; em_error_string() names either. `stream` is a
 * cudaStream_t (NULL: the legacy default stream).
 */
#ifndef EDGEMAMBA_MAMBA_KERNELS_H
#define EDGEMAMBA_MAMBA_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EM_ABI_VERSION 1

enum em_dtype { EM_FLOAT32 = 0, EM_FLOAT16 = 1 };

enum em_error {
  EM_OK = 0,
  EM_ERR_SHAPE = -1,       /* a size is not positive, or n_heads is not a multiple of n_groups */
  EM_ERR_DTYPE = -2,       /* dtype code is not an em_dtype */
  EM_ERR_D_STATE = -3,     /* d_state too large for the kernel (> 1024, or > 256 when not a multiple of 4) */
  EM_ERR_NULL = -4,        /* a required pointer is NULL */
  EM_ERR_CONV_WIDTH = -5,  /* conv width outside 2..64 */
  EM_ERR_SIZE = -6,        /* batch > 65535, or H·P, channels or seqlen > 2^26 */
};

int em_abi_version(void);
const char *em_error_string(int code);

int em_selective_state_update(const float *state_in, float *state_out, const void *x, const void *dt,
                              const void *A, const void *B, const void *C, const void *D, const void *z,
                              const void *dt_bias, void *y, int64_t batch, int64_t n_heads, int64_t head_dim,
                              int64_t n_groups, int64_t d_state, int a_per_state, int dt_softplus, float dt_min,
                              float dt_max, int act_dtype, int weight_dtype, void *stream);

int em_selective_scan(const float *state_in, float *state_out, const void *x, const void *dt, const void *A,
                      const void *B, const void *C, const void *D, const void *z, const void *dt_bias, void *y,
                      int64_t batch, int64_t seqlen, int64_t n_heads, int64_t head_dim, int64_t n_groups,
                      int64_t d_state, int a_per_state, int dt_softplus, float dt_min, float dt_max, int act_dtype,
                      int weight_dtype, void *stream);

/* x (b, C) act dtype; conv_state_in/out (b, C, K-1) float32 (may be equal); weight (C, K) and
 * bias (C) weight dtype, bias NULL = none; y (b, C) act dtype.
 * window = concat(conv_state, x); y = act(sum_k window·weight + bias); conv_state' = window[:, :, 1:]. */
int em_causal_conv1d_step(const void *x, const float *conv_state_in, float *conv_state_out, const void *weight,
                          const void *bias, void *y, int64_t batch, int64_t channels, int64_t width, int silu,
                          int act_dtype, int weight_dtype, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* EDGEMAMBA_MAMBA_KERNELS_H */
