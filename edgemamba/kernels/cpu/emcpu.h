/* edgemamba's native CPU engine: the Mamba decode step and chunked prefill, reading the weights
 * of an ort-cpu artifact in place (weights.bin, mapped by the caller). C ABI, driven by ctypes
 * (edgemamba/runtimes/native.py) and by the test driver built for aarch64 (tests/native/).
 *
 * Weight formats are the ones the ort-cpu graphs already store, so one weights.bin serves both
 * ONNX Runtime and this engine:
 *   EM_F32_KN / EM_F16_KN  projection weights transposed to (K in, N out), float32 / float16
 *   EM_F32_NK / EM_F16_NK  tables kept (N rows, K): embedding, LM head
 *   EM_Q8_NK / EM_Q4_NK    ONNX Runtime's MatMulNBits: uint8 codes (N, K/block, block·bits/8),
 *                          zero point 2^(bits-1), float32 scales (N, K/block); 4-bit low nibble first
 * Activations, the residual stream and the recurrent state are float32 (weight-only quantization).
 */
#ifndef EMCPU_H
#define EMCPU_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EM_API __attribute__((visibility("default")))

enum { EM_NONE = 0, EM_F32_KN = 1, EM_F16_KN = 2, EM_F32_NK = 3, EM_F16_NK = 4, EM_Q8_NK = 5, EM_Q4_NK = 6 };

typedef struct {
    const void *data;
    const float *scales; /* quantized formats only */
    int32_t fmt, k, n, block;
    /* quantized formats: bits of the activations in the integer dot products. 0: the default,
     * 16 for 8-bit weights (float32 results to ~5 digits), 8 for 4-bit weights (as llama.cpp's
     * Q4_0 and ONNX Runtime's MatMulNBits accuracy_level 4). 16 for 4-bit weights: accuracy_level 0. */
    int32_t act_bits;
} em_weight;

typedef struct {
    int32_t arch; /* 1: Mamba-1 (and Falcon-Mamba), 2: Mamba-2 */
    int32_t d_model, n_layer, vocab, d_inner, d_state, d_conv, dt_rank, n_heads, head_dim, n_groups;
    int32_t norm_before_gate; /* Mamba-2 gated norm order */
    float norm_eps, dt_min, dt_max;
    float bcdt_eps; /* Falcon-Mamba: weightless RMSNorm of dt, B, C; <= 0: none */
} em_config;

typedef struct {
    const float *norm, *conv_w /* (conv_dim, d_conv) */, *conv_b, *in_proj_b, *out_proj_b, *dt_bias;
    const float *A; /* Mamba-1 (d_inner, d_state); Mamba-2 (n_heads,) */
    const float *D; /* per channel (d_inner,) */
    const float *gate_norm; /* Mamba-2 (d_inner,) */
    em_weight in_proj, x_proj, dt_proj, out_proj; /* x_proj, dt_proj: Mamba-1 only */
} em_layer;

typedef struct em_model em_model;

/* Returns NULL and writes a one-line reason into err (err_len bytes) on a bad description. The
 * weights are not copied: they must outlive the model. */
EM_API em_model *em_create(const em_config *cfg, const em_weight *embedding, const em_weight *head, const float *norm_f,
                    const em_layer *layers, int n_threads, int max_rows, char *err, int err_len);
EM_API void em_destroy(em_model *m);

/* One token for each of `batch` sequences. conv[i] / ssm[i]: layer i's state, (batch, ...) float32,
 * updated in place. logits: (batch, vocab). */
EM_API void em_step(em_model *m, const int64_t *ids, int batch, float *const *conv, float *const *ssm, float *logits);

/* `t` tokens of one sequence (its state pointers as in em_step with batch 1), in chunks of at most
 * max_rows; logits of the last token into `logits` (vocab,). */
EM_API void em_prefill(em_model *m, const int64_t *ids, int t, float *const *conv, float *const *ssm, float *logits);

/* "avx2" or "generic": what this build's kernels need (the caller checks the CPU supports it). */
EM_API const char *em_isa(void);

/* The kernels a model runs: em_isa(), or "avx512" / "avx512_vnni" where the build and the CPU have
 * them (chosen at em_create: float GEMM, GEMVs, Mamba-2 scan and conv; with VNNI, the int8/int4 prefill
 * GEMM). The environment variable EDGEMAMBA_NATIVE_ISA=avx2 keeps the AVX2 kernels. */
EM_API const char *em_model_isa(const em_model *m);

#ifdef __cplusplus
}
#endif
#endif
