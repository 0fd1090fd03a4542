/* One-pass loops over DCEM's (B, N, d) noise on the CPU, for float and double.
 *
 * dcem/_native.py compiles this file on first use (cc -O3 -march=native) and calls
 * it through ctypes; without a C compiler dcem runs the same sums in PyTorch blocks.
 * All arrays are C-contiguous: w, g_w (B, N); eps, g (B, N, d); a, q, g_a, g_q,
 * g_mu, g_sigma (B, d).
 *
 * noise_moments:     a = sum_n w eps,  q = sum_n w eps^2      (the refit's forward)
 * noise_moments_vjp: g_w = sum_d eps g_a + eps^2 g_q          (its backward w.r.t. w)
 * sample_vjp:        g_mu = sum_n g,  g_sigma = sum_n g eps   (x = mu + sigma eps)
 *
 * Each reads its (B, N, d) inputs once, with no temporaries: the PyTorch form reads a
 * block of problems from memory, then squares or multiplies it and reduces it.
 */
#include <stddef.h>

/* Independent partial sums of the d-long dot products in noise_moments_vjp: the compiler
 * vectorizes them without reassociating (no -ffast-math), and the order is fixed. */
#define LANES 16

#define DCEM_KERNELS(T, S)                                                                 \
    void noise_moments_##S(const T *restrict w, const T *restrict eps, T *restrict a,      \
                           T *restrict q, long B, long N, long d) {                        \
        for (long b = 0; b < B; ++b) {                                                     \
            T *restrict ab = a + b * d, *restrict qb = q + b * d;                          \
            const T *restrict wb = w + b * N, *restrict eb = eps + b * N * d;              \
            for (long j = 0; j < d; ++j) ab[j] = qb[j] = 0;                                \
            for (long n = 0; n < N; ++n) {                                                 \
                const T wn = wb[n], *restrict en = eb + n * d;                             \
                _Pragma("omp simd") for (long j = 0; j < d; ++j) {                         \
                    const T t = wn * en[j];                                                \
                    ab[j] += t;                                                            \
                    qb[j] += t * en[j];                                                    \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    void noise_moments_vjp_##S(const T *restrict eps, const T *restrict g_a,               \
                               const T *restrict g_q, T *restrict g_w, long B, long N,     \
                               long d) {                                                   \
        for (long b = 0; b < B; ++b) {                                                     \
            const T *restrict ga = g_a + b * d, *restrict gq = g_q + b * d;                \
            for (long n = 0; n < N; ++n) {                                                 \
                const T *restrict en = eps + (b * N + n) * d;                              \
                T acc[LANES] = {0}, s = 0;                                                 \
                long j = 0;                                                                \
                for (; j + LANES <= d; j += LANES)                                         \
                    for (long l = 0; l < LANES; ++l)                                       \
                        acc[l] += en[j + l] * (ga[j + l] + en[j + l] * gq[j + l]);         \
                for (; j < d; ++j) s += en[j] * (ga[j] + en[j] * gq[j]);                   \
                for (long l = 0; l < LANES; ++l) s += acc[l];                              \
                g_w[b * N + n] = s;                                                        \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    void sample_vjp_##S(const T *restrict g, const T *restrict eps, T *restrict g_mu,      \
                        T *restrict g_sigma, long B, long N, long d) {                     \
        for (long b = 0; b < B; ++b) {                                                     \
            T *restrict m = g_mu + b * d, *restrict s = g_sigma + b * d;                   \
            for (long j = 0; j < d; ++j) m[j] = s[j] = 0;                                  \
            for (long n = 0; n < N; ++n) {                                                 \
                const T *restrict gn = g + (b * N + n) * d, *restrict en = eps + (b * N + n) * d; \
                _Pragma("omp simd") for (long j = 0; j < d; ++j) {                         \
                    m[j] += gn[j];                                                         \
                    s[j] += gn[j] * en[j];                                                 \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }

DCEM_KERNELS(float, f32)
DCEM_KERNELS(double, f64)
