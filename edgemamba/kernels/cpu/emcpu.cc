// edgemamba's native CPU engine (see emcpu.h). One file on purpose: the whole decode step is here.
//
// Why it exists (benchmarks/RESULTS.md, issue 6): ONNX Runtime runs the decode step as ~1000 small
// nodes, which costs more than the weights' memory traffic on a small model, expands fp16 weights
// to float32 copies, and its int8 kernels either quantize activations (below the int8 accuracy bar)
// or run 60x slower. Here a step is a few passes over the weights, read in their stored format.
//
// Layout: thread pool; math (exp, softplus, silu: branch-free so loops vectorize); linear layers
// (small-M kernels that stream the weights once, and a panel GEMM for prefill chunks); the Mamba
// mixers; the C API.
#include "emcpu.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define EM_AVX2 1
// AVX-512 (and VNNI) kernels, compiled into every x86 build and chosen per model at em_create when the
// CPU has them (twice AVX2's work per instruction on cores with full-width units, such as Zen 4/5 and
// Xeons). Function attributes rather than build flags: the library still loads on AVX2-only CPUs.
#define EM_HAS_AVX512 1
#define EM_AVX512_FN __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#define EM_VNNI_FN __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")))
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// denormals: a decaying state underflows into them, and x86 runs them ~100x slower. Flushed to
// zero while the engine runs (per thread; the caller's mode is restored on return).
// ---------------------------------------------------------------------------------------------
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
    unsigned saved;
    FlushDenormals() {
        __asm__ volatile("stmxcsr %0" : "=m"(saved));
        unsigned v = saved | 0x8040;  // FTZ | DAZ
        __asm__ volatile("ldmxcsr %0" : : "m"(v));
    }
    ~FlushDenormals() { __asm__ volatile("ldmxcsr %0" : : "m"(saved)); }
#elif defined(__aarch64__)
    uint64_t saved;
    FlushDenormals() {
        __asm__ volatile("mrs %0, fpcr" : "=r"(saved));
        uint64_t v = saved | (1ull << 24);  // FZ
        __asm__ volatile("msr fpcr, %0" : : "r"(v));
    }
    ~FlushDenormals() { __asm__ volatile("msr fpcr, %0" : : "r"(saved)); }
#endif
};

// ---------------------------------------------------------------------------------------------
// thread pool: the caller is thread 0. Workers spin briefly between jobs (a decode step dispatches
// ~5 jobs per layer, each tens of microseconds), then sleep until the next job.
// ---------------------------------------------------------------------------------------------
using Job = void (*)(void *ctx, int tid, int nth);

struct Pool {
    int n = 1;
    std::vector<std::thread> threads;
    Job job = nullptr;
    void *ctx = nullptr;
    std::atomic<unsigned> gen{0};
    std::atomic<int> done{0};
    bool stop = false;
    std::mutex mu;
    std::condition_variable cv;

    explicit Pool(int n_threads) : n(std::max(1, n_threads)) {
        for (int i = 1; i < n; i++) threads.emplace_back([this, i] { worker(i); });
    }
    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(mu);
            stop = true;
            gen.fetch_add(1, std::memory_order_release);
        }
        cv.notify_all();
        for (auto &t : threads) t.join();
    }
    void run(Job j, void *c) {
        if (n == 1) return j(c, 0, 1);
        job = j;
        ctx = c;
        done.store(0, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(mu);
            gen.fetch_add(1, std::memory_order_release);
        }
        cv.notify_all();
        j(c, 0, n);
        for (int spins = 0; done.load(std::memory_order_acquire) < n - 1; spins++) backoff(spins);
    }
    // Spin first (a job is tens of microseconds); past that, yield the core: on a busy machine a
    // spinning thread can hold the core that the thread it waits for needs.
    static inline void backoff(int spins) {
        if (spins < 4096) pause();
        else std::this_thread::yield();
    }
    static inline void pause() {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ volatile("yield");
#endif
    }
    void worker(int tid) {
        FlushDenormals ftz;
        unsigned seen = 0;
        for (;;) {
            auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
            unsigned g;
            for (int spins = 0;; spins++) {
                g = gen.load(std::memory_order_acquire);
                if (g != seen) break;
                if ((spins & 1023) == 1023 && std::chrono::steady_clock::now() > until) {
                    std::unique_lock<std::mutex> lock(mu);
                    cv.wait(lock, [&] { return gen.load(std::memory_order_acquire) != seen; });
                }
                backoff(spins);
            }
            seen = g;
            if (stop) return;
            job(ctx, tid, n);
            done.fetch_add(1, std::memory_order_release);
        }
    }
};

// Items [0, n) split evenly over the threads, in multiples of `align`.
inline void split(int n, int align, int tid, int nth, int *b, int *e) {
    int units = (n + align - 1) / align;
    *b = std::min(n, (int)((long)units * tid / nth) * align);
    *e = std::min(n, (int)((long)units * (tid + 1) / nth) * align);
}

template <class F>
void parallel(Pool &pool, F &f) {
    pool.run([](void *c, int tid, int nth) { (*static_cast<F *>(c))(tid, nth); }, &f);
}

// f(row) for rows [0, rows): split over the threads when there are enough rows to pay for it.
template <class F>
void parallel_rows(Pool &pool, int rows, F f) {
    if (rows < 4) {
        for (int r = 0; r < rows; r++) f(r);
        return;
    }
    auto job = [&](int tid, int nth) {
        int r0, r1;
        split(rows, 1, tid, nth, &r0, &r1);
        for (int r = r0; r < r1; r++) f(r);
    };
    parallel(pool, job);
}

// ---------------------------------------------------------------------------------------------
// math: branch-free float32 functions, so the loops that call them vectorize (x86 and NEON)
// ---------------------------------------------------------------------------------------------
inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// exp(x), relative error ~2e-7; results below FLT_MIN flush to ~1e-38 (never denormal).
inline float em_exp(float x) {
    x = std::min(std::max(x, -87.3f), 88.7f);
    float k = std::floor(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693145751953125f - k * 1.42860682030941723212e-6f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    return p * bits_to_float((uint32_t)((int32_t)k + 127) << 23);
}

// log(u) for u >= 1 (normal floats), relative error ~1e-7.
inline float em_log(float u) {
    uint32_t bits = float_to_bits(u);
    float e = (float)((int32_t)(bits >> 23) - 127);
    float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
    if (m > 1.41421356f) {  // [sqrt(2)/2, sqrt(2)) keeps s small; a select, not a branch
        m *= 0.5f;
        e += 1.f;
    }
    float s = (m - 1.f) / (m + 1.f), s2 = s * s;
    float p = 1.f / 11;
    p = p * s2 + 1.f / 9;
    p = p * s2 + 1.f / 7;
    p = p * s2 + 1.f / 5;
    p = p * s2 + 1.f / 3;
    p = p * s2 + 1.f;
    return 2.f * s * p + e * 0.693147180559945309f;
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(w) = log(1+w)·w/((1+w)-1) keeps tiny w exact.
inline float em_softplus(float x) {
    float w = em_exp(-std::fabs(x));
    float u = 1.f + w, d = u - 1.f;
    float l1p = d == 0.f ? w : em_log(u) * (w / d);
    return std::max(x, 0.f) + l1p;
}

inline float em_silu(float x) { return x / (1.f + em_exp(-x)); }

inline float half_to_float(uint16_t h) {
#ifdef EM_AVX2
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 f;
    std::memcpy(&f, &h, 2);
    return (float)f;
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {  // zero or subnormal
        float v = std::ldexp((float)man, -24);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
#endif
}

inline float weight_value(float v) { return v; }
inline float weight_value(uint16_t v) { return half_to_float(v); }

// ---------------------------------------------------------------------------------------------
// linear layers: Y (m, n) = X (m, k) · W (+ bias); X rows ldx apart, Y rows ldy apart
// ---------------------------------------------------------------------------------------------
constexpr int kSmallM = 4;  // up to this many rows: stream the weights once, no packing

// Prefill kernels: chosen per model at em_create from what the CPU has.
enum class Isa { kBase /* the build's: AVX2 or generic */, kAvx512, kVnni /* AVX-512 with VNNI */ };

// Row nn of an NK weight, dequantized to float32 (k values): embedding lookup and panel packing.
void dequant_row(const em_weight &w, int nn, float *out) {
    const int k = w.k;
    if (w.fmt == EM_F32_NK) {
        std::memcpy(out, static_cast<const float *>(w.data) + (long)nn * k, sizeof(float) * k);
        return;
    }
    if (w.fmt == EM_F16_NK) {
        const uint16_t *r = static_cast<const uint16_t *>(w.data) + (long)nn * k;
        for (int i = 0; i < k; i++) out[i] = half_to_float(r[i]);
        return;
    }
    const int bs = w.block, nb = (k + bs - 1) / bs, bytes = bs * (w.fmt == EM_Q8_NK ? 8 : 4) / 8;
    const uint8_t *codes = static_cast<const uint8_t *>(w.data) + (long)nn * nb * bytes;
    const float *sc = w.scales + (long)nn * nb;
    for (int b = 0; b < nb; b++) {  // block by block: loops without divisions, so they vectorize
        const uint8_t *blk = codes + (long)b * bytes;
        const float scale = sc[b];
        float *o = out + (long)b * bs;
        const int len = std::min(bs, k - b * bs);
        if (w.fmt == EM_Q8_NK) {
            for (int j = 0; j < len; j++) o[j] = ((int)blk[j] - 128) * scale;
        } else {
            for (int j = 0; j < len / 2; j++) {
                o[2 * j] = ((int)(blk[j] & 0x0F) - 8) * scale;
                o[2 * j + 1] = ((int)(blk[j] >> 4) - 8) * scale;
            }
            if (len & 1) o[len - 1] = ((int)(blk[len / 2] & 0x0F) - 8) * scale;
        }
    }
}

#ifdef EM_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif

// KN (k, n) float weights, M <= 4 rows: the partial product of weight rows [k0, k1) into Y's
// columns [n0, n1); eight weight rows per pass, so each Y chunk is read and written once per eight
// rows of W. Threads take row ranges: each streams one contiguous stretch of W.
template <class T, int M>
void small_kn(const T *W, int k0, int k, int n, const float *X, int ldx, float *Y, int ldy, int n0, int n1) {
    for (int m = 0; m < M; m++) std::fill(Y + (long)m * ldy + n0, Y + (long)m * ldy + n1, 0.f);
    int kk = k0;
#ifdef EM_AVX2
    constexpr int R = 8;
    const int nv = n0 + (n1 - n0) / 8 * 8;
    for (; kk + R <= k; kk += R) {
        const T *w0 = W + (long)kk * n;
        __m256 a[M][R];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < R; j++) a[m][j] = _mm256_set1_ps(X[(long)m * ldx + kk + j]);
        for (int c = n0; c < nv; c += 8) {
            __m256 v[R];
            for (int j = 0; j < R; j++) v[j] = load8(w0 + (long)j * n + c);
            for (int m = 0; m < M; m++) {
                float *y = Y + (long)m * ldy + c;
                __m256 s0 = _mm256_mul_ps(a[m][0], v[0]), s1 = _mm256_mul_ps(a[m][1], v[1]);
                for (int j = 2; j < R; j += 2) {
                    s0 = _mm256_fmadd_ps(a[m][j], v[j], s0);
                    s1 = _mm256_fmadd_ps(a[m][j + 1], v[j + 1], s1);
                }
                _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), _mm256_add_ps(s0, s1)));
            }
        }
        for (int c = nv; c < n1; c++)
            for (int m = 0; m < M; m++)
                for (int j = 0; j < R; j++)
                    Y[(long)m * ldy + c] += X[(long)m * ldx + kk + j] * weight_value(W[(long)(kk + j) * n + c]);
    }
#endif
    for (; kk < k; kk++) {
        const T *w = W + (long)kk * n;
        for (int m = 0; m < M; m++) {
            const float a = X[(long)m * ldx + kk];
            float *y = Y + (long)m * ldy;
            for (int c = n0; c < n1; c++) y[c] += a * weight_value(w[c]);
        }
    }
}

#ifdef EM_HAS_AVX512
EM_AVX512_FN inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
EM_AVX512_FN inline __m512 load16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

// small_kn with 16 columns a vector (decode on AVX-512 CPUs: float16 weights converted 16 at a time).
template <class T, int M>
EM_AVX512_FN void small_kn512(const T *W, int k0, int k, int n, const float *X, int ldx, float *Y, int ldy, int n0, int n1) {
    for (int m = 0; m < M; m++) std::fill(Y + (long)m * ldy + n0, Y + (long)m * ldy + n1, 0.f);
    constexpr int R = 8;
    const int nv = n0 + (n1 - n0) / 16 * 16;
    int kk = k0;
    for (; kk + R <= k; kk += R) {
        const T *w0 = W + (long)kk * n;
        __m512 a[M][R];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < R; j++) a[m][j] = _mm512_set1_ps(X[(long)m * ldx + kk + j]);
        for (int c = n0; c < nv; c += 16) {
            __m512 v[R];
            for (int j = 0; j < R; j++) v[j] = load16(w0 + (long)j * n + c);
            for (int m = 0; m < M; m++) {
                float *y = Y + (long)m * ldy + c;
                __m512 s0 = _mm512_mul_ps(a[m][0], v[0]), s1 = _mm512_mul_ps(a[m][1], v[1]);
                for (int j = 2; j < R; j += 2) {
                    s0 = _mm512_fmadd_ps(a[m][j], v[j], s0);
                    s1 = _mm512_fmadd_ps(a[m][j + 1], v[j + 1], s1);
                }
                _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), _mm512_add_ps(s0, s1)));
            }
        }
        for (int c = nv; c < n1; c++)
            for (int m = 0; m < M; m++)
                for (int j = 0; j < R; j++)
                    Y[(long)m * ldy + c] += X[(long)m * ldx + kk + j] * weight_value(W[(long)(kk + j) * n + c]);
    }
    for (; kk < k; kk++) {
        const T *w = W + (long)kk * n;
        for (int m = 0; m < M; m++) {
            const float a = X[(long)m * ldx + kk];
            float *y = Y + (long)m * ldy;
            for (int c = n0; c < n1; c++) y[c] += a * weight_value(w[c]);
        }
    }
}
#endif

// NK float weights, M <= 4 rows: outputs [n0, n1), one dot product per weight row. U independent
// accumulators per row of X: one FMA chain would wait on its own latency.
template <class T, int M>
void small_nk(const T *W, int k, const float *X, int ldx, float *Y, int ldy, int n0, int n1) {
    for (int r = n0; r < n1; r++) {
        const T *w = W + (long)r * k;
        float acc[M];
        int kk = 0;
#ifdef EM_AVX2
        constexpr int U = M == 1 ? 4 : 2;
        __m256 v[M][U];
        for (int m = 0; m < M; m++)
            for (int u = 0; u < U; u++) v[m][u] = _mm256_setzero_ps();
        for (; kk + 8 * U <= k; kk += 8 * U)
            for (int u = 0; u < U; u++) {
                __m256 wv = load8(w + kk + 8 * u);
                for (int m = 0; m < M; m++) v[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(X + (long)m * ldx + kk + 8 * u), v[m][u]);
            }
        for (; kk + 8 <= k; kk += 8) {
            __m256 wv = load8(w + kk);
            for (int m = 0; m < M; m++) v[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(X + (long)m * ldx + kk), v[m][0]);
        }
        for (int m = 0; m < M; m++) {
            for (int u = 1; u < U; u++) v[m][0] = _mm256_add_ps(v[m][0], v[m][u]);
            acc[m] = hsum(v[m][0]);
        }
#else
        for (int m = 0; m < M; m++) acc[m] = 0.f;
#endif
        for (; kk < k; kk++)
            for (int m = 0; m < M; m++) acc[m] += weight_value(w[kk]) * X[(long)m * ldx + kk];
        for (int m = 0; m < M; m++) Y[(long)m * ldy + r] = acc[m];
    }
}

// ---- MatMulNBits weights (q8 / q4), M <= 4 rows ----------------------------------------------
// Integer dot products: the activations are quantized per weight block (symmetric, round to
// nearest), int16 for 8-bit weights (error ~1e-5 of the block's largest value: float32 results to
// about five digits, the int8 accuracy bar's weight-only numerics) and int8 for 4-bit weights (as
// llama.cpp's Q4_0 x Q8_0 and ONNX Runtime's MatMulNBits at accuracy_level 4 do). Codes multiply
// as unsigned integers and the zero point comes off per block in int32, exactly. Each block's
// integer sum is scaled once: weight scale x activation scale.
struct QuantX {
    int nb = 0, bs = 0;
    std::vector<int16_t> q16;  // 8-bit weights: (m, nb*bs)
    std::vector<int8_t> q8;    // 4-bit weights: (m, nb*bs), each 32 values evens first, then odds
    std::vector<float> scale;  // (m, nb)
    std::vector<int32_t> zero; // (m, nb, 8): zero point x activation codes, in the kernel's lane order
};

// Position of element i (of 32) in the 4-bit layout: a 16-byte group of nibbles unpacks to the 16
// low nibbles (elements 0, 2, ..., 30) then the 16 high ones (1, 3, ..., 31).
inline int q4_pos(int i) { return (i & 1) * 16 + (i >> 1); }

// act_bits 16: natural order, lanes of madd over 16-element groups; 8: 4-bit layout, maddubs lanes.
void quantize_x(const float *X, int ldx, int m, int k, int bs, int wbits, int act_bits, QuantX &q) {
    const int nb = (k + bs - 1) / bs, kp = nb * bs, zp = wbits == 8 ? 128 : 8;
    const float qmax = act_bits == 16 ? 32767.f : 127.f;
    q.nb = nb, q.bs = bs;
    q.scale.resize((size_t)m * nb);
    q.zero.assign((size_t)m * nb * 8, 0);
    if (act_bits == 16) q.q16.assign((size_t)m * kp, 0);
    else q.q8.assign((size_t)m * kp, 0);
    int32_t v[1024];  // one block's codes (blocks are at most 1024, em_create checks)
    for (int r = 0; r < m; r++)
        for (int b = 0; b < nb; b++) {
            const float *x = X + (long)r * ldx + (long)b * bs;
            const int len = std::min(bs, k - b * bs);
            float amax = 0.f;
            for (int j = 0; j < len; j++) amax = std::max(amax, std::fabs(x[j]));
            const float d = amax / qmax, inv = amax > 0.f ? qmax / amax : 0.f;
            q.scale[(size_t)r * nb + b] = d;
            for (int j = 0; j < len; j++) v[j] = (int32_t)std::nearbyint(x[j] * inv);  // to nearest even, vectorized
            for (int j = len; j < bs; j++) v[j] = 0;
            int32_t *z = &q.zero[((size_t)r * nb + b) * 8];
            if (act_bits == 16) {  // natural order; element j lands in lane (j % 16) / 2 of madd's sums
                int16_t *dst = q.q16.data() + (size_t)r * kp + (size_t)b * bs;
                for (int j = 0; j < bs; j++) dst[j] = (int16_t)v[j];
                for (int j = 0; j < bs; j += 16)
                    for (int l = 0; l < 8; l++) z[l] += zp * (v[j + 2 * l] + v[j + 2 * l + 1]);
            } else {  // the 4-bit layout; position p lands in lane (p % 32) / 4 of maddubs + madd
                int8_t *dst = q.q8.data() + (size_t)r * kp + (size_t)b * bs;
                for (int j = 0; j < bs; j += 32)
                    for (int i = 0; i < 32; i++) {
                        const int pos = q4_pos(i);
                        dst[j + pos] = (int8_t)v[j + i];
                        z[pos / 4] += zp * v[j + i];
                    }
            }
        }
}

template <int BITS, int ACT, int M>
void small_q(const em_weight &w, const QuantX &q, float *Y, int ldy, int n0, int n1) {
    const int nb = q.nb, bs = q.bs, kp = nb * bs, bytes = bs * BITS / 8;
    const uint8_t *codes = static_cast<const uint8_t *>(w.data);
    for (int r = n0; r < n1; r++) {
        const uint8_t *row = codes + (long)r * nb * bytes;
        const float *sc = w.scales + (long)r * nb;
#ifdef EM_AVX2
        __m256 facc[M];
        for (int m = 0; m < M; m++) facc[m] = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (long)b * bytes;
            __m256i iacc[M];
            for (int m = 0; m < M; m++) iacc[m] = _mm256_setzero_si256();
            for (int j = 0; j < bs; j += 32) {
                if (ACT == 16) {
                    __m256i w0, w1;
                    if (BITS == 8) {
                        w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + j)));
                        w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + j + 16)));
                    } else {  // nibbles back in element order: low, high, low, high, ...
                        const __m128i c = _mm_loadu_si128((const __m128i *)(blk + j / 2)), mask = _mm_set1_epi8(0x0F);
                        const __m128i lo = _mm_and_si128(c, mask), hi = _mm_and_si128(_mm_srli_epi16(c, 4), mask);
                        w0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi));
                        w1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo, hi));
                    }
                    for (int m = 0; m < M; m++) {
                        const int16_t *x = q.q16.data() + (size_t)m * kp + (size_t)b * bs + j;
                        iacc[m] = _mm256_add_epi32(iacc[m], _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x)));
                        iacc[m] = _mm256_add_epi32(iacc[m], _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16))));
                    }
                } else {
                    const __m128i c = _mm_loadu_si128((const __m128i *)(blk + j / 2)), mask = _mm_set1_epi8(0x0F);
                    const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(c, 4), mask), _mm_and_si128(c, mask));
                    for (int m = 0; m < M; m++) {
                        const int8_t *x = q.q8.data() + (size_t)m * kp + (size_t)b * bs + j;
                        __m256i p = _mm256_maddubs_epi16(wv, _mm256_loadu_si256((const __m256i *)x));
                        iacc[m] = _mm256_add_epi32(iacc[m], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
                    }
                }
            }
            for (int m = 0; m < M; m++) {
                const size_t mb = (size_t)m * nb + b;
                __m256i exact = _mm256_sub_epi32(iacc[m], _mm256_loadu_si256((const __m256i *)&q.zero[mb * 8]));
                facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_set1_ps(sc[b] * q.scale[mb]), facc[m]);
            }
        }
        for (int m = 0; m < M; m++) Y[(long)m * ldy + r] = hsum(facc[m]);
#else
        float acc[M] = {};
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (long)b * bytes;
            for (int m = 0; m < M; m++) {
                int32_t dot = 0;
                if (ACT == 16) {
                    const int16_t *x = q.q16.data() + (size_t)m * kp + (size_t)b * bs;
                    if (BITS == 8)
                        for (int j = 0; j < bs; j++) dot += ((int32_t)blk[j] - 128) * x[j];
                    else
                        for (int j = 0; j < bs; j++) dot += ((int32_t)((blk[j / 2] >> ((j & 1) * 4)) & 0x0F) - 8) * x[j];
                } else {
                    const int8_t *x = q.q8.data() + (size_t)m * kp + (size_t)b * bs;
                    for (int j = 0; j < bs; j += 32)
                        for (int i = 0; i < 16; i++) {
                            const uint8_t c = blk[(j >> 1) + i];
                            dot += ((int32_t)(c & 0x0F) - 8) * x[j + i] + ((int32_t)(c >> 4) - 8) * x[j + 16 + i];
                        }
                }
                acc[m] += (float)dot * (sc[b] * q.scale[(size_t)m * nb + b]);
            }
        }
        for (int m = 0; m < M; m++) Y[(long)m * ldy + r] = acc[m];
#endif
    }
}

template <int M>
void q_rows(const em_weight &w, int wbits, int act_bits, const QuantX &q, float *Y, int ldy, int n0, int n1) {
    if (wbits == 8) small_q<8, 16, M>(w, q, Y, ldy, n0, n1);
    else if (act_bits == 16) small_q<4, 16, M>(w, q, Y, ldy, n0, n1);
    else small_q<4, 8, M>(w, q, Y, ldy, n0, n1);
}

// KN formats, outputs [n0, n1) over all weight rows (small layers: no partial sums to add up).
template <int M>
void kn_cols(const em_weight &w, const float *X, int ldx, float *Y, int ldy, int n0, int n1, bool wide) {
#ifdef EM_HAS_AVX512
    if (wide) {
        if (w.fmt == EM_F32_KN) small_kn512<float, M>((const float *)w.data, 0, w.k, w.n, X, ldx, Y, ldy, n0, n1);
        else small_kn512<uint16_t, M>((const uint16_t *)w.data, 0, w.k, w.n, X, ldx, Y, ldy, n0, n1);
        return;
    }
#endif
    if (w.fmt == EM_F32_KN) small_kn<float, M>((const float *)w.data, 0, w.k, w.n, X, ldx, Y, ldy, n0, n1);
    else small_kn<uint16_t, M>((const uint16_t *)w.data, 0, w.k, w.n, X, ldx, Y, ldy, n0, n1);
}

// NK formats: outputs [n0, n1). KN formats: the partial sum over weight rows [n0, n1), all outputs.
template <int M>
void small_linear(const em_weight &w, const float *X, int ldx, float *Y, int ldy, int n0, int n1, bool wide) {
#ifdef EM_HAS_AVX512
    if (wide && w.fmt == EM_F32_KN) return small_kn512<float, M>((const float *)w.data, n0, n1, w.n, X, ldx, Y, ldy, 0, w.n);
    if (wide && w.fmt == EM_F16_KN) return small_kn512<uint16_t, M>((const uint16_t *)w.data, n0, n1, w.n, X, ldx, Y, ldy, 0, w.n);
#endif
    switch (w.fmt) {
    case EM_F32_KN: return small_kn<float, M>((const float *)w.data, n0, n1, w.n, X, ldx, Y, ldy, 0, w.n);
    case EM_F16_KN: return small_kn<uint16_t, M>((const uint16_t *)w.data, n0, n1, w.n, X, ldx, Y, ldy, 0, w.n);
    case EM_F32_NK: return small_nk<float, M>((const float *)w.data, w.k, X, ldx, Y, ldy, n0, n1);
    case EM_F16_NK: return small_nk<uint16_t, M>((const uint16_t *)w.data, w.k, X, ldx, Y, ldy, n0, n1);
    case EM_Q8_NK:
    case EM_Q4_NK: break;  // small_q, on activations quantized once per call
    }
}

// Columns [n0, n0 + nb) of W as a float32 panel (k, nbp), nbp = nb rounded up to 16, zero-padded.
void pack_panel(const em_weight &w, int n0, int nb, int nbp, float *panel, float *rowbuf) {
    const int k = w.k;
    if (w.fmt == EM_F32_KN || w.fmt == EM_F16_KN) {
        // The rows' stretches are short and far apart (n columns): fetch 16 rows ahead, so several
        // memory reads are in flight (packing waits on memory: it is the first read of each chunk).
        const int es = w.fmt == EM_F32_KN ? 4 : 2;
        const char *base = (const char *)w.data + (long)n0 * es;
        for (int kk = 0; kk < k; kk++) {
            if (kk + 16 < k)
                for (int off = 0; off < nb * es; off += 64) __builtin_prefetch(base + (long)(kk + 16) * w.n * es + off);
            float *p = panel + (long)kk * nbp;
            if (w.fmt == EM_F32_KN) {
                std::memcpy(p, (const float *)w.data + (long)kk * w.n + n0, sizeof(float) * nb);
            } else {
                const uint16_t *s = (const uint16_t *)w.data + (long)kk * w.n + n0;
                int j = 0;
#ifdef EM_AVX2
                for (; j + 8 <= nb; j += 8) _mm256_storeu_ps(p + j, load8(s + j));
#endif
                for (; j < nb; j++) p[j] = half_to_float(s[j]);
            }
            std::fill(p + nb, p + nbp, 0.f);
        }
        return;
    }
    // NK: eight rows dequantized side by side (rowbuf: 8 x k), then transposed 8x8 at a time.
    for (int j0 = 0; j0 < nbp; j0 += 8) {
        for (int j = 0; j < 8; j++) {
            float *rb = rowbuf + (long)j * k;
            if (j0 + j < nb) dequant_row(w, n0 + j0 + j, rb);
            else std::fill(rb, rb + k, 0.f);
        }
        int kk = 0;
#ifdef EM_AVX2
        for (; kk + 8 <= k; kk += 8) {
            __m256 r[8], t[8];
            for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(rowbuf + (long)j * k + kk);
            for (int j = 0; j < 8; j += 2) t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]), t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
            for (int j = 0; j < 8; j += 4) {
                r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44), r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
                r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44), r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
            }
            for (int j = 0; j < 4; j++) {
                _mm256_storeu_ps(panel + (long)(kk + j) * nbp + j0, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
                _mm256_storeu_ps(panel + (long)(kk + j + 4) * nbp + j0, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
            }
        }
#endif
        for (; kk < k; kk++)
            for (int j = 0; j < 8; j++) panel[(long)kk * nbp + j0 + j] = rowbuf[(long)j * k + kk];
    }
}

// Y[0:R, 0:16] = X[0:R, :] · P[:, 0:16] (P rows ldp apart): R rows x 16 columns of accumulators.
template <int R>
void micro(const float *X, int ldx, const float *P, int ldp, int k, float *out /* R x 16 */) {
#ifdef EM_AVX2
    __m256 c[R][2];
    for (int r = 0; r < R; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    for (int kk = 0; kk < k; kk++) {
        __m256 b0 = _mm256_loadu_ps(P + (long)kk * ldp), b1 = _mm256_loadu_ps(P + (long)kk * ldp + 8);
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_broadcast_ss(X + (long)r * ldx + kk);
            c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + r * 16, c[r][0]);
        _mm256_storeu_ps(out + r * 16 + 8, c[r][1]);
    }
#else
    float c[R][16] = {};
    for (int kk = 0; kk < k; kk++)
        for (int r = 0; r < R; r++) {
            const float a = X[(long)r * ldx + kk];
            for (int j = 0; j < 16; j++) c[r][j] += a * P[(long)kk * ldp + j];
        }
    std::memcpy(out, c, sizeof(c));
#endif
}

constexpr int kTileM = 6;

// Y[:, n0:n0+nb] for rows of X; the panel holds nbp (nb rounded up to 16) columns, rows ldp apart.
template <int R>
void tile_rows(const float *X, int ldx, const float *panel, int ldp, int nbp, int k, float *Y, int ldy, int n0, int nb) {
    alignas(32) float out[R * 16];
    for (int j = 0; j < nbp; j += 16) {
        micro<R>(X, ldx, panel + j, ldp, k, out);
        const int w = std::min(16, nb - j);
        for (int r = 0; r < R; r++) std::memcpy(Y + (long)r * ldy + n0 + j, out + r * 16, sizeof(float) * w);
    }
}

void panel_rows(const float *X, int ldx, int m, const float *panel, int ldp, int nbp, int k, float *Y, int ldy, int n0,
                int nb) {
    int r = 0;
    for (; r + kTileM <= m; r += kTileM)
        tile_rows<kTileM>(X + (long)r * ldx, ldx, panel, ldp, nbp, k, Y + (long)r * ldy, ldy, n0, nb);
    const float *x = X + (long)r * ldx;
    float *y = Y + (long)r * ldy;
    switch (m - r) {
    case 5: tile_rows<5>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 4: tile_rows<4>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 3: tile_rows<3>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 2: tile_rows<2>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 1: tile_rows<1>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    }
}

#ifdef EM_HAS_AVX512
bool cpu_has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}

// Y[0:R, 0:w] = X[0:R, :] · P[:, 0:w], w <= 16*NV: R rows x NV vectors of 16 accumulators, written
// straight to Y (masked at the panel's last columns).
template <int R, int NV>
EM_AVX512_FN void micro512(const float *X, int ldx, const float *P, int ldp, int k, float *Y, int ldy, int w) {
    __m512 c[R][NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) c[r][v] = _mm512_setzero_ps();
    for (int kk = 0; kk < k; kk++) {
        __m512 b[NV];
        for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_ps(P + (long)kk * ldp + 16 * v);
        for (int r = 0; r < R; r++) {
            const __m512 a = _mm512_set1_ps(X[(long)r * ldx + kk]);
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            const int left = w - 16 * v;
            float *y = Y + (long)r * ldy + 16 * v;
            if (left >= 16) _mm512_storeu_ps(y, c[r][v]);
            else if (left > 0) _mm512_mask_storeu_ps(y, (__mmask16)((1u << left) - 1), c[r][v]);
        }
}

template <int R>
EM_AVX512_FN void tile_rows512(const float *X, int ldx, const float *panel, int ldp, int nbp, int k, float *Y, int ldy,
                               int n0, int nb) {
    int j = 0;
    for (; j + 32 <= nbp; j += 32) micro512<R, 2>(X, ldx, panel + j, ldp, k, Y + n0 + j, ldy, nb - j);
    if (j < nbp) micro512<R, 1>(X, ldx, panel + j, ldp, k, Y + n0 + j, ldy, nb - j);
}

// 12 rows x 32 columns: 24 of the 32 vector registers accumulate.
EM_AVX512_FN void panel_rows512(const float *X, int ldx, int m, const float *panel, int ldp, int nbp, int k, float *Y,
                                int ldy, int n0, int nb) {
    int r = 0;
    for (; r + 12 <= m; r += 12)
        tile_rows512<12>(X + (long)r * ldx, ldx, panel, ldp, nbp, k, Y + (long)r * ldy, ldy, n0, nb);
    const float *x = X + (long)r * ldx;
    float *y = Y + (long)r * ldy;
    switch (m - r) {
    case 11: tile_rows512<11>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 10: tile_rows512<10>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 9: tile_rows512<9>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 8: tile_rows512<8>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 7: tile_rows512<7>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 6: tile_rows512<6>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 5: tile_rows512<5>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 4: tile_rows512<4>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 3: tile_rows512<3>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 2: tile_rows512<2>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    case 1: tile_rows512<1>(x, ldx, panel, ldp, nbp, k, y, ldy, n0, nb); break;
    }
}

// One output row of a 4-tap conv (inputs x0..x3, oldest first) and its SiLU, 16 channels a vector.
EM_AVX512_FN void conv4_row512(const float *wt, int C, const float *bias, const float *x0, const float *x1,
                               const float *x2, const float *x3, float *o, int c0, int c1) {
#pragma omp simd
    for (int ch = c0; ch < c1; ch++) {
        const float a = (bias ? bias[ch] : 0.f) + wt[ch] * x0[ch] + wt[C + ch] * x1[ch] + wt[2 * C + ch] * x2[ch] +
                        wt[3 * C + ch] * x3[ch];
        o[ch] = em_silu(a);
    }
}

// One Mamba-2 head, one token: h[p, :] = h[p, :] * dA + dt * x[p] * B; y[p] = h[p, :] · C + D[p] * x[p],
// four channels at a time so each B and C vector is loaded once for four state rows. n % 16 == 0.
EM_AVX512_FN void scan2_head512(float *hs, int hd, int n, float dA, float dtv, const float *x, const float *B,
                                const float *Cc, const float *D, float *y) {
    const __m512 va = _mm512_set1_ps(dA);
    int p = 0;
    for (; p + 4 <= hd; p += 4) {
        __m512 acc[4], dx[4];
        for (int q = 0; q < 4; q++) acc[q] = _mm512_setzero_ps(), dx[q] = _mm512_set1_ps(dtv * x[p + q]);
        for (int i = 0; i < n; i += 16) {
            const __m512 b = _mm512_loadu_ps(B + i), c = _mm512_loadu_ps(Cc + i);
            for (int q = 0; q < 4; q++) {
                float *h = hs + (long)(p + q) * n + i;
                const __m512 hv = _mm512_fmadd_ps(_mm512_loadu_ps(h), va, _mm512_mul_ps(dx[q], b));
                _mm512_storeu_ps(h, hv);
                acc[q] = _mm512_fmadd_ps(hv, c, acc[q]);
            }
        }
        // the four sums at once: halves added pairwise down to one 128-bit vector (y[p..p+3])
        const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
        const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
        // s01 lanes (per 128-bit part): a0 b0 a1 b1 -> pairs; combine to a b c d per part
        const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
        const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
        const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        const __m128 xv = _mm_loadu_ps(x + p);
        _mm_storeu_ps(y + p, _mm_fmadd_ps(_mm_loadu_ps(D + p), xv, sum));
    }
    for (; p < hd; p++) {
        __m512 acc = _mm512_setzero_ps(), dx = _mm512_set1_ps(dtv * x[p]);
        for (int i = 0; i < n; i += 16) {
            float *h = hs + (long)p * n + i;
            const __m512 hv = _mm512_fmadd_ps(_mm512_loadu_ps(h), va, _mm512_mul_ps(dx, _mm512_loadu_ps(B + i)));
            _mm512_storeu_ps(h, hv);
            acc = _mm512_fmadd_ps(hv, _mm512_loadu_ps(Cc + i), acc);
        }
        y[p] = _mm512_reduce_add_ps(acc) + D[p] * x[p];
    }
}

// ---- quantized prefill with integer dot products (AVX-512 VNNI) -----------------------------
// Activations are quantized per block as in decode (quantize_x: int8 codes for 4-bit weights, int16
// for 8-bit), then multiplied exactly in int32 per block: vpdpbusd (4-bit codes as u8 x int8, the zero
// point taken out with the block's code sum) or vpdpwssd (8-bit codes minus 128, as int16 x int16).
// A unit is what one lane multiplies per instruction: 4 positions (4-bit) or 2 elements (8-bit).
bool cpu_has_vnni() {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
}

// 16x16 32-bit transpose: r[i] lane j -> r[j] lane i.
EM_AVX512_FN inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88), t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88), t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++)
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88), r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
}

// Columns [n0, n0 + nb) of float NK weights (rows of k) as a float32 panel (k, nbp): 16 rows read side
// by side, 16 of their columns transposed in registers at a time (pack_panel's NK path goes through a
// row buffer and 8x8 transposes: mamba2-130m fp16 prefill 10% slower than from KN weights).
EM_AVX512_FN void pack_panel_nk512(const em_weight &w, int n0, int nb, int nbp, float *panel) {
    const int k = w.k;
    const bool half = w.fmt == EM_F16_NK;
    const int es = half ? 2 : 4;
    for (int j0 = 0; j0 < nbp; j0 += 16) {
        const int rows = std::min(16, nb - j0);
        const char *row0 = static_cast<const char *>(w.data) + (long)(n0 + j0) * k * es;
        int kk = 0;
        for (; kk + 16 <= k; kk += 16) {
            __m512i r[16];
            for (int j = 0; j < rows; j++) {
                const char *p = row0 + ((long)j * k + kk) * es;
                __builtin_prefetch(p + 512);  // 16 short streams: run ahead of the hardware prefetcher
                r[j] = _mm512_castps_si512(half ? load16((const uint16_t *)p) : load16((const float *)p));
            }
            for (int j = rows; j < 16; j++) r[j] = _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(panel + (long)(kk + i) * nbp + j0, _mm512_castsi512_ps(r[i]));
        }
        for (; kk < k; kk++)
            for (int j = 0; j < 16; j++) {
                const long at = (long)(n0 + j0 + j) * k + kk;
                panel[(long)kk * nbp + j0 + j] =
                    j >= rows ? 0.f : half ? half_to_float(static_cast<const uint16_t *>(w.data)[at])
                                           : static_cast<const float *>(w.data)[at];
            }
    }
}

// Units g .. g+15 of a weight row (g % 16 == 0): 4-bit, 32 bytes of codes (two 32-element groups,
// each its 16 low nibbles then its 16 high ones: positions in quantize_x's order) as u8; 8-bit, 32
// codes minus 128 as int16 pairs.
EM_VNNI_FN inline __m512i row_units16(const uint8_t *row, int g, bool q4) {
    if (!q4)
        return _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + 2 * g))),
                                _mm512_set1_epi16(128));
    const __m256i c = _mm256_loadu_si256((const __m256i *)(row + 2 * g)), m4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(c, m4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(lo, hi, 0x20)),
                              _mm256_permute2x128_si256(lo, hi, 0x31), 1);
}

// Unit g of a weight row, one at a time (the row's last units when fewer than 16 are left).
inline uint32_t row_unit(const uint8_t *row, int g, bool q4) {
    if (!q4) {
        const uint16_t a = (uint16_t)(row[2 * g] - 128), b = (uint16_t)(row[2 * g + 1] - 128);
        return a | (uint32_t)b << 16;
    }
    uint32_t v = 0;  // positions 4(g%8) .. +3 of group g/8: low nibbles (g%8 < 4) or high ones
    const uint8_t *grp = row + (g / 8) * 16;
    const int u = g % 8, shift = u < 4 ? 0 : 4;
    for (int i = 0; i < 4; i++) v |= (uint32_t)((grp[(u % 4) * 4 + i] >> shift) & 0x0F) << (8 * i);
    return v;
}

// Panel for columns [n0, n0 + nb): units (nblk * units_per_block, nbp) of 32-bit lanes, each
// column's lane the weight codes that meet the activations' unit; scales (nblk, nbp). nbp % 16 == 0.
// Sixteen columns x sixteen units at a time, transposed in registers, written as whole vectors.
EM_VNNI_FN void pack_panel_int(const em_weight &w, int n0, int nb, int nbp, uint32_t *panel, float *scales) {
    const int bs = w.block, nblk = (w.k + bs - 1) / bs, q4 = w.fmt == EM_Q4_NK;
    const int bytes = q4 ? bs / 2 : bs, total = nblk * (q4 ? bs / 4 : bs / 2), full = total / 16 * 16;
    const uint8_t *codes = static_cast<const uint8_t *>(w.data);
    for (int j0 = 0; j0 < nbp; j0 += 16) {
        const uint8_t *rows[16];
        for (int c = 0; c < 16; c++) rows[c] = j0 + c < nb ? codes + (long)(n0 + j0 + c) * nblk * bytes : nullptr;
        for (int g = 0; g < full; g += 16) {
            __m512i r[16];
            for (int c = 0; c < 16; c++) r[c] = rows[c] ? row_units16(rows[c], g, q4) : _mm512_setzero_si512();
            transpose16(r);
            for (int u = 0; u < 16; u++) _mm512_storeu_si512(panel + (long)(g + u) * nbp + j0, r[u]);
        }
        for (int g = full; g < total; g++)
            for (int c = 0; c < 16; c++) panel[(long)g * nbp + j0 + c] = rows[c] ? row_unit(rows[c], g, q4) : 0u;
        for (int b = 0; b < nblk; b++)
            for (int c = 0; c < 16; c++) scales[(long)b * nbp + j0 + c] = rows[c] ? w.scales[(long)(n0 + j0 + c) * nblk + b] : 0.f;
    }
}

// Y[0:R, 0:w] for one 16*NV-column tile: xq rows of 32-bit units (kp/4 or kp/2 a row), xs (R, nblk)
// activation scales, corr (R, nblk) the zero point times the block's code sum (4-bit only).
template <int R, int NV, bool Q4>
EM_VNNI_FN void micro_int(const uint32_t *xq, int ldq, const float *xs, const int32_t *corr, int nblk, int units,
                          const uint32_t *P, const float *S, int nbp, float *Y, int ldy, int w) {
    __m512 f[R][NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) f[r][v] = _mm512_setzero_ps();
    for (int b = 0; b < nblk; b++) {
        __m512i acc[R][NV];
        for (int r = 0; r < R; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_si512();
        const uint32_t *pb = P + (long)b * units * nbp;
        const long u0 = (long)b * units;
        for (int u = 0; u < units; u++) {
            __m512i wv[NV];
            for (int v = 0; v < NV; v++) wv[v] = _mm512_loadu_si512(pb + (long)u * nbp + 16 * v);
            for (int r = 0; r < R; r++) {
                const __m512i xv = _mm512_set1_epi32((int)xq[(long)r * ldq + u0 + u]);
                for (int v = 0; v < NV; v++)
                    acc[r][v] = Q4 ? _mm512_dpbusd_epi32(acc[r][v], wv[v], xv) : _mm512_dpwssd_epi32(acc[r][v], wv[v], xv);
            }
        }
        __m512 ws[NV];
        for (int v = 0; v < NV; v++) ws[v] = _mm512_loadu_ps(S + (long)b * nbp + 16 * v);
        for (int r = 0; r < R; r++) {
            const __m512 sx = _mm512_set1_ps(xs[(long)r * nblk + b]);
            const __m512i cr = _mm512_set1_epi32(Q4 ? corr[(long)r * nblk + b] : 0);
            for (int v = 0; v < NV; v++) {
                const __m512 exact = _mm512_cvtepi32_ps(Q4 ? _mm512_sub_epi32(acc[r][v], cr) : acc[r][v]);
                f[r][v] = _mm512_fmadd_ps(exact, _mm512_mul_ps(ws[v], sx), f[r][v]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            const int left = w - 16 * v;
            float *y = Y + (long)r * ldy + 16 * v;
            if (left >= 16) _mm512_storeu_ps(y, f[r][v]);
            else if (left > 0) _mm512_mask_storeu_ps(y, (__mmask16)((1u << left) - 1), f[r][v]);
        }
}

template <int R, bool Q4>
EM_VNNI_FN void tile_rows_int(const uint32_t *xq, int ldq, const float *xs, const int32_t *corr, int nblk, int units,
                              const uint32_t *P, const float *S, int nbp, float *Y, int ldy, int n0, int nb) {
    int j = 0;
    for (; j + 32 <= nbp; j += 32)
        micro_int<R, 2, Q4>(xq, ldq, xs, corr, nblk, units, P + j, S + j, nbp, Y + n0 + j, ldy, nb - j);
    if (j < nbp) micro_int<R, 1, Q4>(xq, ldq, xs, corr, nblk, units, P + j, S + j, nbp, Y + n0 + j, ldy, nb - j);
}

template <bool Q4>
EM_VNNI_FN void panel_rows_int(const uint32_t *xq, int ldq, const float *xs, const int32_t *corr, int nblk, int units,
                               int m, const uint32_t *P, const float *S, int nbp, float *Y, int ldy, int n0, int nb) {
    int r = 0;
    for (; r + 6 <= m; r += 6)
        tile_rows_int<6, Q4>(xq + (long)r * ldq, ldq, xs + (long)r * nblk, corr + (long)r * nblk, nblk, units, P, S,
                             nbp, Y + (long)r * ldy, ldy, n0, nb);
    const uint32_t *x = xq + (long)r * ldq;
    const float *s = xs + (long)r * nblk;
    const int32_t *c = corr + (long)r * nblk;
    float *y = Y + (long)r * ldy;
    switch (m - r) {
    case 5: tile_rows_int<5, Q4>(x, ldq, s, c, nblk, units, P, S, nbp, y, ldy, n0, nb); break;
    case 4: tile_rows_int<4, Q4>(x, ldq, s, c, nblk, units, P, S, nbp, y, ldy, n0, nb); break;
    case 3: tile_rows_int<3, Q4>(x, ldq, s, c, nblk, units, P, S, nbp, y, ldy, n0, nb); break;
    case 2: tile_rows_int<2, Q4>(x, ldq, s, c, nblk, units, P, S, nbp, y, ldy, n0, nb); break;
    case 1: tile_rows_int<1, Q4>(x, ldq, s, c, nblk, units, P, S, nbp, y, ldy, n0, nb); break;
    }
}
#else
inline bool cpu_has_avx512() { return false; }
inline bool cpu_has_vnni() { return false; }
#endif

// Scratch memory left uninitialized, so its pages are touched only when used: a process that only
// decodes never faults in the rows that prefill chunks use (peak RSS is a bar on small devices).
struct Buffer {
    std::unique_ptr<float[]> p;
    size_t size = 0;
    void resize(size_t n) { p.reset(new float[n]), size = n; }
    float *data() { return p.get(); }
    const float *data() const { return p.get(); }
    float &operator[](size_t i) { return p[i]; }
    const float &operator[](size_t i) const { return p[i]; }
};

struct Scratch {  // per thread: a packed panel and a row buffer (thread 0: quantized activations)
    Buffer panel, row, xq;  // xq (thread 0): a prefill chunk's activations as rounded by quantize_x
    QuantX qx;
};

// Activations back from their codes (the values quantized weights meet): prefill without VNNI.
void dequant_x(const QuantX &q, int m, int k, int act_bits, float *out) {
    const int nb = q.nb, bs = q.bs, kp = nb * bs;
    for (int r = 0; r < m; r++)
        for (int b = 0; b < nb; b++) {
            const float d = q.scale[(size_t)r * nb + b];
            float *o = out + (long)r * k + (long)b * bs;
            const int len = std::min(bs, k - b * bs);
            if (act_bits == 16) {
                const int16_t *c = q.q16.data() + (size_t)r * kp + (size_t)b * bs;
                for (int j = 0; j < len; j++) o[j] = c[j] * d;
            } else {
                const int8_t *c = q.q8.data() + (size_t)r * kp + (size_t)b * bs;
                for (int j = 0; j < len; j++) o[j] = c[(j & ~31) + q4_pos(j & 31)] * d;
            }
        }
}

// Columns per panel: the panel (k x nb floats) stays within ~512 KiB, in L2 while the rows reuse it
// (256 KiB: 0.93x the prefill speed, A/B on mamba-130m fp32 and mamba2-130m int8).
inline int panel_cols(int k) { return std::max(16, std::min(128, (131072 / std::max(k, 1)) / 16 * 16)); }

void linear(Pool &pool, std::vector<Scratch> &scratch, const em_weight &w, const float *X, int ldx, int m, float *Y,
            int ldy, const float *bias, Isa isa) {
    const bool quant = w.fmt == EM_Q8_NK || w.fmt == EM_Q4_NK, kn_all = w.fmt == EM_F32_KN || w.fmt == EM_F16_KN;
    // Large KN layers split by weight rows (one contiguous stream per thread, partial sums added up
    // after); small ones (x_proj, dt_proj) by columns, which saves that second job.
    const bool kn = kn_all && w.k >= 256 && w.n >= 256;
    QuantX &qx = scratch[0].qx;
    const int wbits = w.fmt == EM_Q8_NK ? 8 : 4, act_bits = wbits == 8 || w.act_bits == 16 ? 16 : 8;
    // Quantized weights always meet activations rounded per block (int16 for 8-bit weights, int8 for
    // 4-bit unless the graph asks for float activations): the same numbers in decode and prefill.
    if (quant) quantize_x(X, ldx, m, w.k, w.block, wbits, act_bits, qx);
    const int pc = panel_cols(w.k), nblk = quant ? (w.k + w.block - 1) / w.block : 0;
    const int units = wbits == 8 ? w.block / 2 : w.block / 4;
    const size_t int_panel = (size_t)nblk * units * 4 + (size_t)nblk * 4;  // bytes per panel column
    // Prefill on integer dot products: VNNI, 8-bit x int16 or 4-bit x int8 activations, panel fits.
    const bool int_gemm = quant && m > kSmallM && isa == Isa::kVnni && (wbits == 8 || act_bits == 8) &&
                          int_panel * ((pc + 15) / 16 * 16) <= scratch[0].panel.size * sizeof(float);
    const bool wide = isa != Isa::kBase;  // AVX-512 float kernels
    std::vector<int32_t> corr;  // 4-bit: zero point x code sum, per (row, block)
    if (quant && m > kSmallM && !int_gemm) {  // the float GEMM on the rounded activations
        dequant_x(qx, m, w.k, act_bits, scratch[0].xq.data());
        X = scratch[0].xq.data(), ldx = w.k;
    }
#ifdef EM_HAS_AVX512
    if (int_gemm && wbits == 4) {
        corr.resize((size_t)m * nblk);
        for (size_t i = 0; i < corr.size(); i++) {
            int32_t t = 0;
            for (int l = 0; l < 8; l++) t += qx.zero[i * 8 + l];
            corr[i] = t;
        }
    }
#endif
    auto job = [&](int tid, int nth) {
        int n0, n1;
        if (m <= kSmallM) {
            // KN: split the weight rows, each thread's partial sums in its scratch, added up below.
            float *out = kn ? scratch[tid].panel.data() : Y;
            const int ldo = kn ? w.n : ldy;
            split(kn ? w.k : w.n, kn ? 8 : kn_all ? 8 : 1, tid, nth, &n0, &n1);
            if (kn && n0 >= n1) std::fill(out, out + (long)m * w.n, 0.f);
            if (n0 < n1 && quant) {
                switch (m) {
                case 1: q_rows<1>(w, wbits, act_bits, qx, Y, ldy, n0, n1); break;
                case 2: q_rows<2>(w, wbits, act_bits, qx, Y, ldy, n0, n1); break;
                case 3: q_rows<3>(w, wbits, act_bits, qx, Y, ldy, n0, n1); break;
                default: q_rows<4>(w, wbits, act_bits, qx, Y, ldy, n0, n1); break;
                }
            } else if (n0 < n1 && kn_all && !kn) {
                switch (m) {
                case 1: kn_cols<1>(w, X, ldx, Y, ldy, n0, n1, wide); break;
                case 2: kn_cols<2>(w, X, ldx, Y, ldy, n0, n1, wide); break;
                case 3: kn_cols<3>(w, X, ldx, Y, ldy, n0, n1, wide); break;
                default: kn_cols<4>(w, X, ldx, Y, ldy, n0, n1, wide); break;
                }
            } else if (n0 < n1) {
                switch (m) {
                case 1: small_linear<1>(w, X, ldx, out, ldo, n0, n1, wide); break;
                case 2: small_linear<2>(w, X, ldx, out, ldo, n0, n1, wide); break;
                case 3: small_linear<3>(w, X, ldx, out, ldo, n0, n1, wide); break;
                default: small_linear<4>(w, X, ldx, out, ldo, n0, n1, wide); break;
                }
            }
            if (kn) return;
        } else {
            const int blocks = (w.n + pc - 1) / pc;
            int b0, b1;
            split(blocks, 1, tid, nth, &b0, &b1);
            Scratch &s = scratch[tid];
            for (int b = b0; b < b1; b++) {
                const int c0 = b * pc, nb = std::min(pc, w.n - c0), nbp = (nb + 15) / 16 * 16;
#ifdef EM_HAS_AVX512
                if (int_gemm) {
                    uint32_t *P = reinterpret_cast<uint32_t *>(s.panel.data());
                    float *S = reinterpret_cast<float *>(P + (size_t)nblk * units * nbp);
                    pack_panel_int(w, c0, nb, nbp, P, S);
                    const uint32_t *xq = reinterpret_cast<const uint32_t *>(
                        wbits == 8 ? (const void *)qx.q16.data() : (const void *)qx.q8.data());
                    const int ldq = nblk * units;
                    if (wbits == 4)
                        panel_rows_int<true>(xq, ldq, qx.scale.data(), corr.data(), nblk, units, m, P, S, nbp, Y, ldy, c0, nb);
                    else
                        panel_rows_int<false>(xq, ldq, qx.scale.data(), nullptr, nblk, units, m, P, S, nbp, Y, ldy, c0, nb);
                    continue;
                }
#endif
                // Packed even for float32 KN weights: read in place (rows n floats apart) the same GEMM ran
                // at 0.7x the speed (mamba-130m fp32 prefill 495 vs 700 tokens/s, A/B in one session).
#ifdef EM_HAS_AVX512
                if (isa != Isa::kBase && (w.fmt == EM_F32_NK || w.fmt == EM_F16_NK))
                    pack_panel_nk512(w, c0, nb, nbp, s.panel.data());
                else
#endif
                    pack_panel(w, c0, nb, nbp, s.panel.data(), s.row.data());
#ifdef EM_HAS_AVX512
                if (isa != Isa::kBase) panel_rows512(X, ldx, m, s.panel.data(), nbp, nbp, w.k, Y, ldy, c0, nb);
                else
#endif
                    panel_rows(X, ldx, m, s.panel.data(), nbp, nbp, w.k, Y, ldy, c0, nb);
            }
            n0 = std::min(w.n, b0 * pc), n1 = std::min(w.n, b1 * pc);
        }
        if (bias)
            for (int r = 0; r < m; r++)
                for (int c = n0; c < n1; c++) Y[(long)r * ldy + c] += bias[c];
    };
    parallel(pool, job);
    if (kn && m <= kSmallM) {  // Y = the threads' partial sums (+ bias), split by columns
        auto reduce = [&](int tid, int nth) {
            int c0, c1;
            split(w.n, 16, tid, nth, &c0, &c1);
            for (int r = 0; r < m; r++) {
                float *y = Y + (long)r * ldy;
                const float *p0 = scratch[0].panel.data() + (long)r * w.n;
                for (int c = c0; c < c1; c++) y[c] = p0[c] + (bias ? bias[c] : 0.f);
                for (int t = 1; t < nth; t++) {
                    const float *pt = scratch[t].panel.data() + (long)r * w.n;
                    for (int c = c0; c < c1; c++) y[c] += pt[c];
                }
            }
        };
        parallel(pool, reduce);
    }
}

// ---------------------------------------------------------------------------------------------
// the model
// ---------------------------------------------------------------------------------------------
void rms_norm(const float *x, const float *weight, float eps, int d, float *out) {
    float ss = 0.f;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    const float inv = 1.f / std::sqrt(ss / d + eps);
    if (weight)
        for (int i = 0; i < d; i++) out[i] = x[i] * inv * weight[i];
    else
        for (int i = 0; i < d; i++) out[i] = x[i] * inv;
}

struct Layer {
    em_layer w;
    std::vector<float> conv_wt;  // (d_conv, conv_dim): the kernel transposed, channels contiguous
};

}  // namespace

struct em_model {
    em_config c;
    em_weight embedding, head;
    const float *norm_f;
    std::vector<Layer> layers;
    int max_rows, conv_dim, in_dim, xdbl_dim;
    Isa isa = Isa::kBase;  // AVX-512 (and VNNI) kernels when the CPU has them (EDGEMAMBA_NATIVE_ISA=avx2 opts out)
    Pool pool;
    std::vector<Scratch> scratch;
    Buffer h, hn, proj, xc, xdbl, dt, y, out;  // (max_rows, width) activations

    em_model(int n_threads) : pool(n_threads) {}

    // ---- one layer over `rows` rows: sequences of `per_seq` consecutive rows each ---------------
    void mixer(int li, int rows, int per_seq, float *const *conv, float *const *ssm);
    void conv_rows(int li, int rows, int per_seq, float *const *conv);
    void scan1(int li, int rows, int per_seq, float *const *ssm);
    void scan2(int li, int rows, int per_seq, float *const *ssm);
    void forward(const int64_t *ids, int rows, int per_seq, float *const *conv, float *const *ssm, float *logits,
                 int first_logit_row);
};

void em_model::conv_rows(int li, int rows, int per_seq, float *const *conv) {
    // conv[s]: sequence s's state (conv_dim, d_conv-1), the last K-1 inputs. x: the conv channels of
    // proj; out: xc. Read in place: inputs before the chunk come from the state, the rest from proj.
    const Layer &L = layers[li];
    const int C = conv_dim, K = c.d_conv, x_off = c.arch == 1 ? 0 : c.d_inner;
    auto job = [&](int tid, int nth) {
        int c0, c1;
        split(C, 16, tid, nth, &c0, &c1);
        if (c0 >= c1) return;
        for (int s = 0; s < rows / per_seq; s++) {
            float *st = conv[s];
            const float *xs = proj.data() + (long)s * per_seq * in_dim + x_off;  // input t: xs + t * in_dim
            for (int t = 0; t < per_seq; t++) {
                float *o = xc.data() + (long)(s * per_seq + t) * C;
                const float *wt = L.conv_wt.data();
                if (K == 4 && t >= 3) {  // the common case, in one pass
                    const float *x0 = xs + (long)(t - 3) * in_dim, *x1 = x0 + in_dim, *x2 = x1 + in_dim, *x3 = x2 + in_dim;
#ifdef EM_HAS_AVX512
                    if (isa != Isa::kBase) {
                        conv4_row512(wt, C, L.w.conv_b, x0, x1, x2, x3, o, c0, c1);
                        continue;
                    }
#endif
                    for (int ch = c0; ch < c1; ch++) {
                        const float a = (L.w.conv_b ? L.w.conv_b[ch] : 0.f) + wt[ch] * x0[ch] + wt[C + ch] * x1[ch] +
                                        wt[2 * C + ch] * x2[ch] + wt[3 * C + ch] * x3[ch];
                        o[ch] = em_silu(a);
                    }
                    continue;
                }
                for (int ch = c0; ch < c1; ch++) o[ch] = L.w.conv_b ? L.w.conv_b[ch] : 0.f;
                for (int j = 0; j < K; j++) {
                    const float *wj = wt + (long)j * C;
                    const int tau = t + j - (K - 1);  // input time; < 0: in the state
                    if (tau >= 0) {
                        const float *x = xs + (long)tau * in_dim;
                        for (int ch = c0; ch < c1; ch++) o[ch] += wj[ch] * x[ch];
                    } else {
                        for (int ch = c0; ch < c1; ch++) o[ch] += wj[ch] * st[(long)ch * (K - 1) + tau + K - 1];
                    }
                }
                for (int ch = c0; ch < c1; ch++) o[ch] = em_silu(o[ch]);
            }
            // The new state: the last K-1 of [old state, inputs]; ascending j reads old entries before
            // they are overwritten.
            for (int j = 0; j < K - 1; j++) {
                const int src = j + per_seq;
                if (src < K - 1) {
                    for (int ch = c0; ch < c1; ch++) st[(long)ch * (K - 1) + j] = st[(long)ch * (K - 1) + src];
                } else {
                    const float *x = xs + (long)(src - (K - 1)) * in_dim;
                    for (int ch = c0; ch < c1; ch++) st[(long)ch * (K - 1) + j] = x[ch];
                }
            }
        }
    };
    parallel(pool, job);
}

void em_model::scan1(int li, int rows, int per_seq, float *const *ssm) {
    const Layer &L = layers[li];
    const int e = c.d_inner, n = c.d_state, r = c.dt_rank, xd = xdbl_dim;
    auto job = [&](int tid, int nth) {
        int d0, d1;
        split(e, 8, tid, nth, &d0, &d1);
        for (int row = 0; row < rows; row++) {  // dt = clamp(softplus(dt_proj(.) + dt_bias)), this thread's channels
            float *v = dt.data() + (long)row * e;
            for (int d = d0; d < d1; d++) v[d] = std::min(std::max(em_softplus(v[d] + L.w.dt_bias[d]), c.dt_min), c.dt_max);
        }
        for (int s = 0; s < rows / per_seq; s++) {
            for (int d = d0; d < d1; d++) {
                float *hs = ssm[s] + (long)d * n;
                const float *A = L.w.A + (long)d * n;
                for (int t = 0; t < per_seq; t++) {
                    const int row = s * per_seq + t;
                    const float dtv = dt[(long)row * e + d], xv = xc[(long)row * e + d];
                    const float *B = xdbl.data() + (long)row * xd + r, *Cc = B + n;
                    const float dx = dtv * xv;
                    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                    for (int i = 0; i < n; i++) {
                        float hv = hs[i] * em_exp(dtv * A[i]) + dx * B[i];
                        hs[i] = hv;
                        acc += hv * Cc[i];
                    }
                    y[(long)row * e + d] = acc;
                }
            }
        }
        for (int row = 0; row < rows; row++) {  // D skip and z gate, vectorized across this thread's channels
            float *yr = y.data() + (long)row * e;
            const float *x = xc.data() + (long)row * e, *z = proj.data() + (long)row * in_dim + e;
            for (int d = d0; d < d1; d++) yr[d] = (yr[d] + L.w.D[d] * x[d]) * em_silu(z[d]);
        }
    };
    parallel(pool, job);
}

void em_model::scan2(int li, int rows, int per_seq, float *const *ssm) {
    const Layer &L = layers[li];
    const int e = c.d_inner, n = c.d_state, nh = c.n_heads, hd = c.head_dim, G = c.n_groups, hpg = nh / G;
    auto job = [&](int tid, int nth) {
        int h0, h1;
        split(nh, 1, tid, nth, &h0, &h1);
        for (int s = 0; s < rows / per_seq; s++) {
            for (int hh = h0; hh < h1; hh++) {
                const int g = hh / hpg;
                for (int t = 0; t < per_seq; t++) {
                    const int row = s * per_seq + t;
                    const float dtv = dt[(long)row * nh + hh], dA = em_exp(dtv * L.w.A[hh]);
                    const float *x = xc.data() + (long)row * conv_dim;
                    const float *B = x + e + (long)g * n, *Cc = x + e + (long)G * n + (long)g * n;
#ifdef EM_HAS_AVX512
                    if (isa != Isa::kBase && n % 16 == 0) {
                        scan2_head512(ssm[s] + (long)hh * hd * n, hd, n, dA, dtv, x + (long)hh * hd, B, Cc,
                                      L.w.D + (long)hh * hd, y.data() + (long)row * e + (long)hh * hd);
                        continue;
                    }
#endif
                    for (int p = 0; p < hd; p++) {
                        const int ch = hh * hd + p;
                        float *hs = ssm[s] + (long)ch * n;
                        const float dx = dtv * x[ch];
                        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                        for (int i = 0; i < n; i++) {
                            float hv = hs[i] * dA + dx * B[i];
                            hs[i] = hv;
                            acc += hv * Cc[i];
                        }
                        y[(long)row * e + ch] = acc + L.w.D[ch] * x[ch];
                    }
                }
            }
        }
    };
    parallel(pool, job);
}

void em_model::mixer(int li, int rows, int per_seq, float *const *conv, float *const *ssm) {
    const Layer &L = layers[li];
    const int e = c.d_inner;
    linear(pool, scratch, L.w.in_proj, hn.data(), c.d_model, rows, proj.data(), in_dim, L.w.in_proj_b, isa);
    conv_rows(li, rows, per_seq, conv);
    if (c.arch == 1) {
        const int r = c.dt_rank, n = c.d_state;
        linear(pool, scratch, L.w.x_proj, xc.data(), e, rows, xdbl.data(), xdbl_dim, nullptr, isa);
        if (c.bcdt_eps > 0)  // Falcon-Mamba: weightless RMSNorm of dt, B and C, each on its own
            parallel_rows(pool, rows, [&](int row) {
                float *v = xdbl.data() + (long)row * xdbl_dim;
                rms_norm(v, nullptr, c.bcdt_eps, r, v);
                rms_norm(v + r, nullptr, c.bcdt_eps, n, v + r);
                rms_norm(v + r + n, nullptr, c.bcdt_eps, n, v + r + n);
            });
        linear(pool, scratch, L.w.dt_proj, xdbl.data(), xdbl_dim, rows, dt.data(), e, nullptr, isa);
        scan1(li, rows, per_seq, ssm);  // softplus of dt included
    } else {
        const int nh = c.n_heads;
        for (int row = 0; row < rows; row++)
            for (int hh = 0; hh < nh; hh++) {
                float v = proj[(long)row * in_dim + e + conv_dim + hh] + L.w.dt_bias[hh];
                dt[(long)row * nh + hh] = std::min(std::max(em_softplus(v), c.dt_min), c.dt_max);
            }
        scan2(li, rows, per_seq, ssm);
        const int G = c.n_groups, gs = e / G;  // gated RMSNorm, per group
        parallel_rows(pool, rows, [&](int row) {
            float *yr = y.data() + (long)row * e;
            const float *z = proj.data() + (long)row * in_dim;
            if (!c.norm_before_gate)
                for (int i = 0; i < e; i++) yr[i] *= em_silu(z[i]);
            for (int g = 0; g < G; g++) rms_norm(yr + (long)g * gs, L.w.gate_norm + (long)g * gs, c.norm_eps, gs, yr + (long)g * gs);
            if (c.norm_before_gate)
                for (int i = 0; i < e; i++) yr[i] *= em_silu(z[i]);
        });
    }
    linear(pool, scratch, L.w.out_proj, y.data(), e, rows, out.data(), c.d_model, L.w.out_proj_b, isa);
}

void em_model::forward(const int64_t *ids, int rows, int per_seq, float *const *conv, float *const *ssm, float *logits,
                       int first_logit_row) {
    const int d = c.d_model;
    for (int r = 0; r < rows; r++) dequant_row(embedding, (int)ids[r], h.data() + (long)r * d);
    const int seqs = rows / per_seq;
    std::vector<float *> cv(seqs), sv(seqs);
    const long conv_size = (long)conv_dim * (c.d_conv - 1), ssm_size = (long)c.d_inner * c.d_state;
    for (int li = 0; li < c.n_layer; li++) {
        for (int s = 0; s < seqs; s++) cv[s] = conv[li] + s * conv_size, sv[s] = ssm[li] + s * ssm_size;
        parallel_rows(pool, rows, [&](int r) {
            float *hr = h.data() + (long)r * d;
            if (li > 0)  // the previous layer's residual add, fused with this layer's norm
                for (int i = 0; i < d; i++) hr[i] += out[(long)r * d + i];
            rms_norm(hr, layers[li].w.norm, c.norm_eps, d, hn.data() + (long)r * d);
        });
        mixer(li, rows, per_seq, cv.data(), sv.data());
    }
    for (long i = 0; i < (long)rows * d; i++) h[i] += out[i];  // the last layer's residual
    if (!logits) return;
    const int lr = rows - first_logit_row;
    for (int r = first_logit_row; r < rows; r++) rms_norm(h.data() + (long)r * d, norm_f, c.norm_eps, d, hn.data() + (long)(r - first_logit_row) * d);
    for (int r0 = 0; r0 < lr; r0 += kSmallM)  // the head: at most a batch of rows, streamed
        linear(pool, scratch, head, hn.data() + (long)r0 * d, d, std::min(kSmallM, lr - r0), logits + (long)r0 * c.vocab, c.vocab, nullptr, isa);
}

// ---------------------------------------------------------------------------------------------
// C API
// ---------------------------------------------------------------------------------------------
namespace {
bool check_weight(const em_weight &w, int k, int n, bool nk_only, const char *name, char *err, int err_len) {
    bool fmt_ok = w.fmt == EM_F32_NK || w.fmt == EM_F16_NK || w.fmt == EM_Q8_NK || w.fmt == EM_Q4_NK ||
                  (!nk_only && (w.fmt == EM_F32_KN || w.fmt == EM_F16_KN));
    const char *why = nullptr;
    if (!w.data) why = "no data";
    else if (!fmt_ok) why = "unsupported format";
    else if (w.k != k || w.n != n) why = "wrong shape";
    else if ((w.fmt == EM_Q8_NK || w.fmt == EM_Q4_NK) && (!w.scales || w.block < 32 || w.block % 32 || w.block > 1024))
        why = "block size must be a multiple of 32 up to 1024 (int32 block sums), with scales";
    if (why) std::snprintf(err, err_len, "%s: %s (format %d, k %d, n %d; expected k %d, n %d)", name, why, w.fmt, w.k, w.n, k, n);
    return !why;
}
}  // namespace

extern "C" {

const char *em_isa(void) {
#ifdef EM_AVX2
    return "avx2";
#else
    return "generic";
#endif
}

em_model *em_create(const em_config *cfg, const em_weight *embedding, const em_weight *head, const float *norm_f,
                    const em_layer *layers, int n_threads, int max_rows, char *err, int err_len) {
    const em_config &c = *cfg;
    if (c.arch != 1 && c.arch != 2) return std::snprintf(err, err_len, "arch must be 1 or 2"), nullptr;
    if (c.d_model <= 0 || c.n_layer <= 0 || c.d_inner <= 0 || c.d_state <= 0 || c.d_conv < 2 || max_rows < 1)
        return std::snprintf(err, err_len, "bad sizes in the model description"), nullptr;
    if (c.arch == 2 && (c.n_heads <= 0 || c.head_dim * c.n_heads != c.d_inner || c.n_groups <= 0 || c.n_heads % c.n_groups))
        return std::snprintf(err, err_len, "bad Mamba-2 head sizes"), nullptr;
    if (!check_weight(*embedding, c.d_model, c.vocab, true, "embedding", err, err_len)) return nullptr;
    if (!check_weight(*head, c.d_model, c.vocab, true, "lm_head", err, err_len)) return nullptr;
    const int conv_dim = c.arch == 1 ? c.d_inner : c.d_inner + 2 * c.n_groups * c.d_state;
    const int in_dim = c.arch == 1 ? 2 * c.d_inner : c.d_inner + conv_dim + c.n_heads;
    const int xdbl_dim = c.arch == 1 ? c.dt_rank + 2 * c.d_state : 0;
    char name[64];
    for (int i = 0; i < c.n_layer; i++) {
        const em_layer &L = layers[i];
        std::snprintf(name, sizeof name, "layers.%d.in_proj", i);
        if (!check_weight(L.in_proj, c.d_model, in_dim, false, name, err, err_len)) return nullptr;
        std::snprintf(name, sizeof name, "layers.%d.out_proj", i);
        if (!check_weight(L.out_proj, c.d_inner, c.d_model, false, name, err, err_len)) return nullptr;
        if (c.arch == 1) {
            std::snprintf(name, sizeof name, "layers.%d.x_proj", i);
            if (!check_weight(L.x_proj, c.d_inner, xdbl_dim, false, name, err, err_len)) return nullptr;
            std::snprintf(name, sizeof name, "layers.%d.dt_proj", i);
            if (!check_weight(L.dt_proj, c.dt_rank, c.d_inner, false, name, err, err_len)) return nullptr;
        }
        if (!L.norm || !L.conv_w || !L.dt_bias || !L.A || !L.D || (c.arch == 2 && !L.gate_norm))
            return std::snprintf(err, err_len, "layers.%d: a required tensor is missing", i), nullptr;
    }
    em_model *m = new em_model(n_threads);
    m->c = c;
    m->embedding = *embedding;
    m->head = *head;
    m->norm_f = norm_f;
    m->max_rows = max_rows;
    m->conv_dim = conv_dim;
    m->in_dim = in_dim;
    m->xdbl_dim = xdbl_dim;
    const char *isa = std::getenv("EDGEMAMBA_NATIVE_ISA");
    const bool base = isa && std::strcmp(isa, "avx2") == 0;
    m->isa = base || !cpu_has_avx512() ? Isa::kBase : cpu_has_vnni() ? Isa::kVnni : Isa::kAvx512;
    for (int i = 0; i < c.n_layer; i++) {
        Layer L{layers[i], std::vector<float>((size_t)c.d_conv * conv_dim)};
        for (int ch = 0; ch < conv_dim; ch++)
            for (int j = 0; j < c.d_conv; j++) L.conv_wt[(size_t)j * conv_dim + ch] = layers[i].conv_w[(long)ch * c.d_conv + j];
        m->layers.push_back(std::move(L));
    }
    int kmax = std::max(c.d_model, c.d_inner);
    m->scratch.resize(m->pool.n);
    for (auto &s : m->scratch) {
        // a panel (prefill) or a thread's partial sums of a KN layer's outputs (decode)
        const int widest = std::max(in_dim, std::max(c.d_inner, c.d_model));
        size_t panel = (size_t)kSmallM * widest;
        for (int k : {c.d_model, c.d_inner, std::max(c.dt_rank, 1)}) panel = std::max(panel, (size_t)k * panel_cols(k));
        s.panel.resize(panel + 64);
        s.row.resize((size_t)8 * kmax + 64);
    }
    m->scratch[0].xq.resize((size_t)max_rows * kmax);  // touched only by quantized prefill without VNNI
    const long R = max_rows;
    m->h.resize(R * c.d_model);
    m->hn.resize(R * c.d_model);
    m->out.resize(R * c.d_model);
    m->proj.resize(R * in_dim);
    m->xc.resize(R * conv_dim);
    m->xdbl.resize(R * std::max(xdbl_dim, 1));
    m->dt.resize(R * (c.arch == 1 ? c.d_inner : c.n_heads));
    m->y.resize(R * c.d_inner);
    return m;
}

void em_destroy(em_model *m) { delete m; }

const char *em_model_isa(const em_model *m) {
    return m->isa == Isa::kVnni ? "avx512_vnni" : m->isa == Isa::kAvx512 ? "avx512" : em_isa();
}

void em_step(em_model *m, const int64_t *ids, int batch, float *const *conv, float *const *ssm, float *logits) {
    FlushDenormals ftz;
    for (int b0 = 0; b0 < batch; b0 += m->max_rows) {  // batches larger than the buffers, in slices
        const int nb = std::min(m->max_rows, batch - b0);
        std::vector<float *> cv(m->c.n_layer), sv(m->c.n_layer);
        const long conv_size = (long)m->conv_dim * (m->c.d_conv - 1), ssm_size = (long)m->c.d_inner * m->c.d_state;
        for (int i = 0; i < m->c.n_layer; i++) cv[i] = conv[i] + b0 * conv_size, sv[i] = ssm[i] + b0 * ssm_size;
        m->forward(ids + b0, nb, 1, cv.data(), sv.data(), logits + (long)b0 * m->c.vocab, 0);
    }
}

void em_prefill(em_model *m, const int64_t *ids, int t, float *const *conv, float *const *ssm, float *logits) {
    FlushDenormals ftz;
    for (int t0 = 0; t0 < t; t0 += m->max_rows) {
        const int n = std::min(m->max_rows, t - t0);
        const bool last = t0 + n == t;
        m->forward(ids + t0, n, n, conv, ssm, last ? logits : nullptr, n - 1);
    }
}

}  // extern "C"
