/*
 * ticketlab sparse kernel: Y[T, N] = X[T, K] @ W[N, K]^T + b for an unstructured-sparse W.
 *
 * Why this shape of kernel
 * ------------------------
 * A lottery ticket's matrices are unstructured-sparse (global magnitude pruning), so no two
 * output rows share a sparsity pattern and classic register blocking over W is impossible. What
 * *is* dense is the token dimension: every nonzero w[n, k] multiplies the same input column
 * X[:, k] for all T tokens. So the kernel works on the transposed activations X^T[k, tokens]:
 *
 *     for each output row n:  Y^T[n, :] += w[n, k] * X^T[k, :]   over the nonzeros k of row n
 *
 * and the inner loop is a broadcast-FMA over a contiguous block of TB tokens held in vector
 * registers (TB = 64: four 512-bit or eight 256-bit accumulators). Per nonzero the kernel loads
 * one int16 index, one float and TB floats of X^T, and issues TB/VW FMAs; nothing is gathered or
 * scattered.
 *
 * Memory layout
 * -------------
 * - X is packed per block of TB tokens into Xb[k][TB] (transposed, zero-padded tail), so the
 *   rows a nonzero touches are contiguous and 64-byte aligned.
 * - W is column-blocked CSR: the K inputs are cut into chunks of KC columns; each chunk has its
 *   own row pointers (int32, absolute) and column indices relative to the chunk (int16), so a
 *   chunk's slice of Xb (KC * TB * 4 bytes: 64 KiB at KC = 256, TB = 64) stays in L1/L2 while
 *   every row of a row chunk streams its nonzeros through it. Partial sums of a row chunk live in
 *   a small buffer between chunks.
 *
 * Threads
 * -------
 * Many token blocks (batched inputs): each thread packs its own token block into a private
 * buffer and computes all output rows for it -- no sharing, no barriers. Few token blocks
 * (one sequence): the blocks are packed cooperatively, then the (token block, row chunk) tiles are
 * shared out dynamically, which balances rows with very different nonzero counts.
 *
 * Variants TB = 16, 32, 64 are compiled from one template; TB < 64 unrolls over nonzeros with
 * independent accumulators so that at least four FMA chains are in flight. Which variant (and
 * which KC, a packing choice) is fastest is measured, not assumed: see ticketlab/sparse/calibration.py.
 *
 * Plain C (GCC vector extensions, OpenMP), no Python or torch headers: it builds in about a second
 * with the system compiler and is called through ctypes with raw pointers.
 */
#include <stdint.h>
#include <stddef.h>
#include <omp.h>

#define TL_ABI_VERSION 1
#define RC 32 /* output rows per tile */

/* Accumulators are native-width vectors: wider GCC vectors than the hardware has are lowered
   through memory (measured: 13x slower with 512-bit vectors on an AVX2-only build). */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* In-register 8x8 transpose (3 shuffle stages; vpermt2ps / vshufps+vperm2f128 on x86). */
static inline void transpose8(v8 r[8]) {
    const v8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], lo);
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
    }
    for (int i = 0; i < 8; i += 4) {
        s[i] = __builtin_shuffle(t[i], t[i + 2], lo2);
        s[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi2);
        s[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo2);
        s[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi2);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = __builtin_shuffle(s[j], s[j + 4], lo4);
        r[j + 4] = __builtin_shuffle(s[j], s[j + 4], hi4);
    }
}

/* xb[k][t] = x[t][k] for k in [k0, k1), t < rows; zero for rows <= t < tb. */
static void pack_block(const float* x, int64_t rows, int K, int k0, int k1, float* xb, int tb) {
    const int64_t r8 = rows & ~(int64_t)7;
    int k = k0;
    for (; k + 8 <= k1; k += 8) {
        for (int64_t t = 0; t < r8; t += 8) {
            v8 r[8];
            for (int i = 0; i < 8; i++) r[i] = *(const v8*)(x + (t + i) * K + k);
            transpose8(r);
            for (int j = 0; j < 8; j++) *(v8*)(xb + (int64_t)(k + j) * tb + t) = r[j];
        }
    }
    for (int kk = k0; kk < k1; kk++) {
        const int64_t from = kk < k ? r8 : 0;
        for (int64_t t = from; t < tb; t++)
            xb[(int64_t)kk * tb + t] = t < rows ? x[t * K + kk] : 0.f;
    }
}

/* y[t0 + t][n] = acc[n - n0][t] + bias[n] for t < rows, n in [n0, n1); acc rows are tb wide. */
static void store_tile(const float* acc, int tb, int64_t t0, int64_t rows, int n0, int n1, int N,
                       const float* bias, float* y) {
    const int64_t r8 = rows & ~(int64_t)7;
    const int n8 = n0 + ((n1 - n0) & ~7);
    /* token rows outer: each output line is completed while it is in L1 (row strides that are
       multiples of 4 KiB, e.g. N = 3072, map all rows of a tile to the same cache sets) */
    for (int64_t t = 0; t < r8; t += 8) {
        for (int n = n0; n < n8; n += 8) {
            v8 b = {0};
            if (bias) b = *(const v8*)(bias + n);
            v8 r[8];
            for (int i = 0; i < 8; i++) r[i] = *(const v8*)(acc + (int64_t)(n - n0 + i) * tb + t);
            transpose8(r);
            for (int j = 0; j < 8; j++) *(v8*)(y + (t0 + t + j) * N + n) = r[j] + b;
        }
    }
    for (int64_t t = 0; t < rows; t++) {
        float* yr = y + (t0 + t) * N;
        for (int m = t < r8 ? n8 : n0; m < n1; m++)
            yr[m] = acc[(int64_t)(m - n0) * tb + t] + (bias ? bias[m] : 0.f);
    }
}

int tl_abi_version(void) { return TL_ABI_VERSION; }

#define DEFINE_SPMM(TB, U)                                                                      \
static void tile_##TB(const float* xt, int K, int kc, const int32_t* rowptr,                   \
                      const int16_t* idx, const float* val, int N, int ncb, int n0, int n1,    \
                      int64_t t0, int64_t rows, const float* bias, float* y) {                 \
    enum { NV = TB / VW };                                                                     \
    vf acc[RC][NV] __attribute__((aligned(64)));                                               \
    for (int c = 0; c < ncb; c++) {                                                            \
        const int32_t* rp = rowptr + (int64_t)c * (N + 1);                                     \
        const float* xc = xt + (int64_t)c * kc * TB;                                           \
        for (int n = n0; n < n1; n++) {                                                        \
            vf a[U][NV];                                                                       \
            for (int u = 0; u < U; u++)                                                        \
                for (int v = 0; v < NV; v++) a[u][v] = (vf){0};                                \
            int32_t p = rp[n];                                                                 \
            const int32_t e = rp[n + 1];                                                       \
            for (; p + U <= e; p += U) {                                                       \
                for (int u = 0; u < U; u++) {                                                  \
                    const vf* xr = (const vf*)(xc + (int64_t)idx[p + u] * TB);                 \
                    const float w = val[p + u];                                                \
                    for (int v = 0; v < NV; v++) a[u][v] += w * xr[v];                         \
                }                                                                              \
            }                                                                                  \
            for (; p < e; p++) {                                                               \
                const vf* xr = (const vf*)(xc + (int64_t)idx[p] * TB);                         \
                const float w = val[p];                                                        \
                for (int v = 0; v < NV; v++) a[0][v] += w * xr[v];                             \
            }                                                                                  \
            for (int u = 1; u < U; u++)                                                        \
                for (int v = 0; v < NV; v++) a[0][v] += a[u][v];                               \
            if (c == 0) {                                                                      \
                for (int v = 0; v < NV; v++) acc[n - n0][v] = a[0][v];                         \
            } else {                                                                           \
                for (int v = 0; v < NV; v++) acc[n - n0][v] += a[0][v];                        \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    if (ncb == 0) {                                                                            \
        for (int n = n0; n < n1; n++)                                                          \
            for (int v = 0; v < NV; v++) acc[n - n0][v] = (vf){0};                             \
    }                                                                                          \
    store_tile((const float*)acc, TB, t0, rows, n0, n1, N, bias, y);                          \
}                                                                                              \
                                                                                               \
/* x [T, K] row-major; ws: max(ceil(T/TB), nthreads) * K * TB floats; y [T, N] row-major. */    \
void tl_spmm_tb##TB(const float* x, int64_t T, int K, float* ws, int kc, int ncb,              \
                    const int32_t* rowptr, const int16_t* idx, const float* val, int N,        \
                    const float* bias, float* y, int nthreads) {                               \
    const int64_t ntb = (T + TB - 1) / TB;                                                     \
    const int nrc = (N + RC - 1) / RC;                                                         \
    if (ntb >= 2 * (int64_t)nthreads) {                                                        \
        _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")                         \
        {                                                                                      \
            float* xt = ws + (int64_t)omp_get_thread_num() * K * TB;                           \
            _Pragma("omp for schedule(dynamic, 1)")                                            \
            for (int64_t tb = 0; tb < ntb; tb++) {                                             \
                const int64_t t0 = tb * TB;                                                    \
                const int64_t rows = T - t0 < TB ? T - t0 : TB;                                \
                pack_block(x + t0 * K, rows, K, 0, K, xt, TB);                                      \
                for (int rc = 0; rc < nrc; rc++) {                                             \
                    const int n0 = rc * RC, n1 = n0 + RC < N ? n0 + RC : N;                    \
                    tile_##TB(xt, K, kc, rowptr, idx, val, N, ncb, n0, n1, t0, rows, bias, y); \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        return;                                                                                \
    }                                                                                          \
    const int nkb = (K + 127) / 128;                                                           \
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")                             \
    {                                                                                          \
        _Pragma("omp for schedule(static)")                                                    \
        for (int64_t job = 0; job < ntb * nkb; job++) {                                        \
            const int64_t tb = job / nkb;                                                      \
            const int kb = (int)(job % nkb);                                                   \
            const int64_t t0 = tb * TB;                                                        \
            const int64_t rows = T - t0 < TB ? T - t0 : TB;                                    \
            const int k0 = kb * 128, k1 = k0 + 128 < K ? k0 + 128 : K;                         \
            pack_block(x + t0 * K, rows, K, k0, k1, ws + tb * K * TB, TB);                          \
        }                                                                                      \
        _Pragma("omp for schedule(dynamic, 1)")                                                \
        for (int64_t job = 0; job < ntb * nrc; job++) {                                        \
            const int64_t tb = job / nrc;                                                      \
            const int rc = (int)(job % nrc);                                                   \
            const int64_t t0 = tb * TB;                                                        \
            const int64_t rows = T - t0 < TB ? T - t0 : TB;                                    \
            const int n0 = rc * RC, n1 = n0 + RC < N ? n0 + RC : N;                            \
            tile_##TB(ws + tb * K * TB, K, kc, rowptr, idx, val, N, ncb, n0, n1, t0, rows,     \
                      bias, y);                                                                \
        }                                                                                      \
    }                                                                                          \
}

DEFINE_SPMM(16, 4)
DEFINE_SPMM(32, 2)
DEFINE_SPMM(64, 1)
