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
 *   a small buffer between chunks. The nonzeros are stored tile-major (a tile's chunk 0, its
 *   chunk 1, ..., then the next tile), the order this loop reads them, so the weight is one
 *   sequential stream for the hardware prefetcher.
 * - Rows are paired within each tile of RC rows by the columns they share. The kernel is bound
 *   by loads (per nonzero: TB/VW loads of X^T, a value and an index for TB/VW FMAs), so a column
 *   two rows share is done as one load of X^T feeding two FMA chains: in isolation 158 against
 *   117 GFLOP/s. A pair's shared columns come first (indices + interleaved values), then each
 *   row's own nonzeros; both streams are stored in the order the kernel reads them.
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
 *
 * Beside the sparse product, this file holds what an encoder layer needs around it, so that the
 * accelerated model is fast outside its sparse matrices too (issue 14):
 * - epilogues fused into every product while its output is still in L1/L2: bias + activation
 *   (erf GELU, tanh GELU, ReLU) and bias + residual + LayerNorm;
 * - a dense GEMM (register-blocked, weights pre-packed in panels) for the layers that stay dense:
 *   on AMD Zen 4, MKL's sgemm reaches 70-90 GFLOP/s on these shapes, this kernel 100-115; on an
 *   Intel Xeon with AVX-512, MKL 145-164 and this kernel 149-174 (1 thread, 128 tokens);
 * - attention (softmax(Q K^T * scale + key mask) V) read straight from the token-major Q/K/V
 *   projections, one (sequence, head) per job, no transposes through PyTorch;
 * - a whole encoder layer in one call (tl_encoder_layer), so that Python is not between its
 *   seven kernel calls.
 * See ticketlab/sparse/fused.py for how a layer is put together from them.
 */
#include <stdint.h>
#include <stddef.h>
#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define TL_ABI_VERSION 7
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

static void act_row(float* y, int n, int act);

/* y[t0 + t][n] = act(acc[n - n0][t] + bias[n]) for t < rows, n in [n0, n1); acc rows are tb
   wide. */
static void store_tile(const float* acc, int tb, int64_t t0, int64_t rows, int n0, int n1, int N,
                       const float* bias, float* y, int act) {
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
        act_row(yr + n0, n1 - n0, act); /* while the tile's rows are in L1 */
    }
}


/* ---------------------------------------------------------------------------------------------
 * Vector math: exp, erf, GELU, LayerNorm rows. Accuracy: exp to ~2 ulp (Cody-Waite reduction +
 * degree-6 polynomial), erf to 1.5e-7 absolute (Abramowitz-Stegun 7.1.26, the formula PyTorch's
 * own vectorised erf uses), so outputs match PyTorch's to float32 rounding.
 * ------------------------------------------------------------------------------------------- */
typedef int32_t vfi __attribute__((vector_size(VW * 4), aligned(4)));

static inline vf vsel(vfi m, vf a, vf b) { return (vf)((m & (vfi)a) | (~m & (vfi)b)); }
static inline vf vsplat(float x) { return (vf){0} + x; }

static inline vf vexp(vf x) {
    const vf hi = vsplat(88.3762626647949f), lo = vsplat(-87.3365447505531f);
    vfi under = x < lo;
    x = vsel(x > hi, hi, x);
    x = vsel(under, lo, x);
    const vf magic = vsplat(12582912.0f); /* 1.5 * 2^23: round to nearest */
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vfi e = (__builtin_convertvector(n, vfi) + 127) << 23;
    vf y = p * (vf)e;
    return vsel(under, (vf){0}, y);
}

/* 1 / x to ~1 ulp: the hardware estimate refined by one Newton step (a vector division takes
   several times longer on Zen 4 and was half of GELU's cost). */
static inline vf vrcp(vf x) {
#if defined(__AVX512F__) && VW == 16
    vf r = (vf)_mm512_rcp14_ps((__m512)x);
    return r * (2.0f - x * r);
#elif defined(__AVX__) && VW == 8
    vf r = (vf)_mm256_rcp_ps((__m256)x);
    r = r * (2.0f - x * r);
    return r * (2.0f - x * r);
#else /* no AVX (e.g. aarch64): an exact division */
    return 1.0f / x;
#endif
}

static inline vf verf(vf x) {
    vfi neg = x < 0;
    vf ax = vsel(neg, -x, x);
    vf t = vrcp(1.0f + 0.3275911f * ax);
    vf poly = vsplat(1.061405429f);
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    vf y = 1.0f - poly * t * vexp(-ax * ax);
    return vsel(neg, -y, y);
}

enum { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3 };

static inline vf vact(vf x, int act) {
    switch (act) {
    case ACT_GELU:
        return 0.5f * x * (1.0f + verf(x * 0.70710678118654752f));
    case ACT_GELU_TANH: { /* 0.5 x (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1) */
        vf u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (2.0f - 2.0f / (vexp(2.0f * u) + 1.0f));
    }
    case ACT_RELU:
        return vsel(x > 0, x, (vf){0});
    default:
        return x;
    }
}

/* y[0:n] = act(y[0:n]) (tails through a padded vector, so every element gets the same math) */
static void act_row(float* y, int n, int act) {
    if (act == ACT_NONE) return;
    int j = 0;
    for (; j + VW <= n; j += VW) *(vf*)(y + j) = vact(*(const vf*)(y + j), act);
    if (j < n) {
        vf t = {0};
        for (int i = 0; j + i < n; i++) t[i] = y[j + i];
        t = vact(t, act);
        for (int i = 0; j + i < n; i++) y[j + i] = t[i];
    }
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* y = LayerNorm(y + res) * gamma + beta over one row of n (res may be NULL) */
static void add_ln_row(float* y, const float* res, const float* gamma, const float* beta, int n,
                       float eps) {
    vf acc = {0};
    float tail = 0.f;
    int j = 0;
    for (; j + VW <= n; j += VW) {
        vf v = *(const vf*)(y + j);
        if (res) v += *(const vf*)(res + j);
        *(vf*)(y + j) = v;
        acc += v;
    }
    for (int m = j; m < n; m++) {
        if (res) y[m] += res[m];
        tail += y[m];
    }
    const float mean = (hsum(acc) + tail) / n;
    vf sq = {0};
    float sqt = 0.f;
    for (j = 0; j + VW <= n; j += VW) {
        vf d = *(const vf*)(y + j) - mean;
        sq += d * d;
    }
    for (int m = j; m < n; m++) sqt += (y[m] - mean) * (y[m] - mean);
    const float rstd = 1.0f / __builtin_sqrtf((hsum(sq) + sqt) / n + eps);
    for (j = 0; j + VW <= n; j += VW) {
        vf d = (*(const vf*)(y + j) - mean) * rstd;
        *(vf*)(y + j) = d * *(const vf*)(gamma + j) + *(const vf*)(beta + j);
    }
    for (int m = j; m < n; m++) y[m] = (y[m] - mean) * rstd * gamma[m] + beta[m];
}

/* Standalone epilogue for a product computed elsewhere (MKL): y = act(y) or LN(y + res). */
void tl_epilogue(float* y, int64_t T, int N, int act, const float* res, const float* gamma,
                 const float* beta, float eps, int nthreads) {
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1 && T > 16)")
    for (int64_t t = 0; t < T; t++) {
        if (act != ACT_NONE) act_row(y + t * N, N, act);
        if (gamma) add_ln_row(y + t * N, res ? res + t * N : NULL, gamma, beta, N, eps);
    }
}

int tl_abi_version(void) { return TL_ABI_VERSION; }

/* Output rows per tile: rows are paired within a tile (ticketlab/sparse/kernels.py). */
int tl_tile_rows(void) { return RC; }

/* A shared column's X^T vector is loaded once into a register for both rows of the pair.
   Without this empty asm (it only tells GCC the value must sit in a vector register) GCC folds
   the load into each of the two FMAs, and a shared column costs two loads per vector, as two
   single rows would: 19 load uops for 16 FMAs at TB = 128 instead of 11. Measured (AMD Zen 5,
   1 thread, random masks, MiniLM and BERT-base shapes at density 0.3-0.7, 128 and 1024 tokens,
   two A/B runs): the best variant against ticketlab's GEMM went from a geometric mean of
   1.12x/1.08x to 1.24x/1.29x, density 0.5 from 0.96-1.20x to 1.10-1.53x. */
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_IN_REGISTER(x) __asm__("" : "+v"(x))
#elif defined(__aarch64__)
#define KEEP_IN_REGISTER(x) __asm__("" : "+w"(x))
#else
#define KEEP_IN_REGISTER(x) ((void)0)
#endif

/* The own nonzeros of row r (CSR row `slot`) of chunk c into the accumulator set S[U][NV]
   (already holding the row's shared-column sums), then into the tile's partial sums acc. A
   macro, not a pointer to S, so that both sets stay in registers. */
#define ROW_SINGLES(S, r, slot, TB, U)                                                         \
    do {                                                                                       \
        int32_t q = rp[slot];                                                                  \
        const int32_t qe = rp[(slot) + 1];                                                     \
        for (; q + U <= qe; q += U) {                                                          \
            for (int u = 0; u < U; u++) {                                                      \
                const vf* xr = (const vf*)(xc + (int64_t)idx[q + u] * TB);                     \
                const float w = val[q + u];                                                    \
                for (int v = 0; v < NV; v++) S[u][v] += w * xr[v];                             \
            }                                                                                  \
        }                                                                                      \
        for (; q < qe; q++) {                                                                  \
            const vf* xr = (const vf*)(xc + (int64_t)idx[q] * TB);                             \
            const float w = val[q];                                                            \
            for (int v = 0; v < NV; v++) S[0][v] += w * xr[v];                                 \
        }                                                                                      \
        for (int u = 1; u < U; u++)                                                            \
            for (int v = 0; v < NV; v++) S[0][v] += S[u][v];                                   \
        if (c == 0) {                                                                          \
            for (int v = 0; v < NV; v++) acc[(r) - n0][v] = S[0][v];                           \
        } else {                                                                               \
            for (int v = 0; v < NV; v++) acc[(r) - n0][v] += S[0][v];                          \
        }                                                                                      \
    } while (0)

#define DEFINE_SPMM(TB, U)                                                                      \
static void tile_##TB(const float* xt, int K, int kc, const int32_t* rowptr,                   \
                      const int16_t* idx, const float* val, const int32_t* grows,              \
                      const int32_t* tgroup, const int32_t* sptr, const int16_t* sidx,         \
                      const float* sval, int ngroups, int N, int ncb, int n0, int n1,          \
                      int64_t t0, int64_t rows, const float* bias, float* y, int act) {        \
    enum { NV = TB / VW };                                                                     \
    vf acc[RC][NV] __attribute__((aligned(64)));                                               \
    const int tile = n0 / RC, ntiles = (N + RC - 1) / RC;                                      \
    const int g0 = tgroup[tile], g1 = tgroup[tile + 1];                                        \
    for (int c = 0; c < ncb; c++) {                                                            \
        /* tile-major storage: one extra pointer per tile closes its last slot */              \
        const int32_t* rp = rowptr + (int64_t)c * (2 * ngroups + ntiles) + tile;               \
        const int32_t* sp = sptr + (int64_t)c * (ngroups + ntiles) + tile;                     \
        const float* xc = xt + (int64_t)c * kc * TB;                                           \
        for (int g = g0; g < g1; g++) {                                                        \
            const int ra = grows[2 * g], rb = grows[2 * g + 1];                                \
            vf a[U][NV], b[U][NV];                                                             \
            for (int u = 0; u < U; u++)                                                        \
                for (int v = 0; v < NV; v++) a[u][v] = b[u][v] = (vf){0};                      \
            /* the pair's shared columns: one load of X^T feeds both rows */                   \
            int32_t p = sp[g];                                                                 \
            int32_t e = sp[g + 1];                                                             \
            for (; p + U <= e; p += U) {                                                       \
                for (int u = 0; u < U; u++) {                                                  \
                    const vf* xr = (const vf*)(xc + (int64_t)sidx[p + u] * TB);                \
                    const float wa = sval[2 * (p + u)], wb = sval[2 * (p + u) + 1];            \
                    for (int v = 0; v < NV; v++) {                                             \
                        vf xv = xr[v];                                                         \
                        KEEP_IN_REGISTER(xv);                                                  \
                        a[u][v] += wa * xv;                                                    \
                        b[u][v] += wb * xv;                                                    \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (; p < e; p++) {                                                               \
                const vf* xr = (const vf*)(xc + (int64_t)sidx[p] * TB);                        \
                const float wa = sval[2 * p], wb = sval[2 * p + 1];                            \
                for (int v = 0; v < NV; v++) {                                                 \
                    vf xv = xr[v];                                                             \
                    KEEP_IN_REGISTER(xv);                                                      \
                    a[0][v] += wa * xv;                                                        \
                    b[0][v] += wb * xv;                                                        \
                }                                                                              \
            }                                                                                  \
            /* each row's own columns (an unpaired row has rb < 0 and only these) */          \
            ROW_SINGLES(a, ra, 2 * g, TB, U);                                                  \
            if (rb >= 0) ROW_SINGLES(b, rb, 2 * g + 1, TB, U);                                 \
        }                                                                                      \
    }                                                                                          \
    if (ncb == 0) {                                                                            \
        for (int n = n0; n < n1; n++)                                                          \
            for (int v = 0; v < NV; v++) acc[n - n0][v] = (vf){0};                             \
    }                                                                                          \
    store_tile((const float*)acc, TB, t0, rows, n0, n1, N, bias, y, act);                     \
}                                                                                              \
                                                                                               \
/* x [T, K] row-major; ws: max(ceil(T/TB), nthreads) * K * TB floats; y [T, N] row-major;     \
   y = act(x W^T + bias), then, if gamma: y = LayerNorm(y + res) * gamma + beta per token. */  \
void tl_spmm_tb##TB(const float* x, int64_t T, int K, float* ws, int kc, int ncb,              \
                    const int32_t* rowptr, const int16_t* idx, const float* val,               \
                    const int32_t* grows, const int32_t* tgroup, const int32_t* sptr,          \
                    const int16_t* sidx, const float* sval, int ngroups, int N,                \
                    const float* bias, float* y, int nthreads, int act, const float* res,      \
                    const float* gamma, const float* beta, float eps) {                        \
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
                    tile_##TB(xt, K, kc, rowptr, idx, val, grows, tgroup, sptr, sidx, sval,    \
                              ngroups, N, ncb, n0, n1, t0, rows, bias, y, act);                \
                }                                                                              \
                if (gamma) /* the block's output rows are still in L2 */                      \
                    for (int64_t t = t0; t < t0 + rows; t++)                                   \
                        add_ln_row(y + t * N, res ? res + t * N : NULL, gamma, beta, N, eps);  \
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
            tile_##TB(ws + tb * K * TB, K, kc, rowptr, idx, val, grows, tgroup, sptr, sidx,    \
                      sval, ngroups, N, ncb, n0, n1, t0, rows, bias, y, act);                  \
        }                                                                                      \
        if (gamma) {                                                                           \
            _Pragma("omp for schedule(static)")                                                \
            for (int64_t t = 0; t < T; t++)                                                    \
                add_ln_row(y + t * N, res ? res + t * N : NULL, gamma, beta, N, eps);          \
        }                                                                                      \
    }                                                                                          \
}

/* U: independent accumulator sets per row, so that at least ~8 FMA chains are in flight (FMA
   latency 4 cycles x 2 pipes); TB = 128 holds 8 vectors per row and streams a weight matrix once
   for a whole 128-token sequence (measured: 0.75-0.85 of the dense GEMM's speed per useful FLOP
   at density 0.5 on BERT-base shapes, against 0.65 for TB = 64). */
#if VW == 16
DEFINE_SPMM(16, 4)
DEFINE_SPMM(32, 2)
DEFINE_SPMM(64, 2)
DEFINE_SPMM(128, 1)
#else
DEFINE_SPMM(16, 4)
DEFINE_SPMM(32, 2)
DEFINE_SPMM(64, 1)
DEFINE_SPMM(128, 1)
#endif

/* ---------------------------------------------------------------------------------------------
 * Dense GEMM for the layers that stay dense: Y[T, N] = act(X[T, K] W[N, K]^T + b), then
 * optionally LayerNorm(Y + res). W is packed once into panels of NR outputs, k-major
 * (wp[p][k][0:NR]); an M x NR block of Y is held in M * NV registers while k runs over all of K
 * (one broadcast of x[t][k] and NV FMAs per row and k). X is read in place, or, when its row
 * stride is a multiple of 4 KiB (K = 1024, 2048, 3072: all M rows would map to the same L1 sets),
 * packed per block of M rows first.
 * ------------------------------------------------------------------------------------------- */
#define NV_G 2
#define NR_G (NV_G * VW)
#if VW == 16
#define MR_G 12
static const int MR_SIZES[] = {12, 8, 4, 2, 1};
#else
#define MR_G 6
static const int MR_SIZES[] = {6, 4, 2, 1};
#endif

int tl_gemm_nr(void) { return NR_G; }

/* wp[p][k][j] = w[p * NR + j][k] (zero beyond N): ceil(N / NR) * K * NR floats */
void tl_gemm_pack(const float* w, int N, int K, float* wp) {
    const int np = (N + NR_G - 1) / NR_G;
    for (int p = 0; p < np; p++)
        for (int k = 0; k < K; k++)
            for (int j = 0; j < NR_G; j++) {
                const int n = p * NR_G + j;
                wp[((int64_t)p * K + k) * NR_G + j] = n < N ? w[(int64_t)n * K + k] : 0.f;
            }
}

/* The next weight panel is prefetched while this one is computed, a slice of its k rows in each
   row block: a model's weights do not stay in L2 between forwards (MiniLM's 37 matrices are 42
   MB), and without this every panel's first pass waited on L3. Measured on an Intel Xeon with
   AVX-512, 1 thread, 128 tokens, cycling through 24 weight matrices of one shape (as a forward
   does): 384x384 131 -> 158 GFLOP/s, 1536x384 121 -> 142, 384x1536 127 -> 145; one matrix kept
   hot: 160-167 either way (MKL: 145-164). Into L1 (prefetcht0) measured a little better than
   into L2. One k row of a panel is NR_G floats, two cache lines with 512-bit vectors.
   PF_SPREAD (default): a row block's slice is issued one row every K / pfn iterations of k
   instead of all at its start, so the prefetches do not queue behind each other and the
   panel's own loads. Same Xeon, BERT-base shapes, weights evicted from L2 before each call
   (GFLOP/s, burst -> spread): 768x768 127-139 -> 145, 3072x768 138-148 -> 150-154, 768x3072
   130-132 -> 145-146; one matrix kept hot: about 4 % lower (160 -> 154). In the whole BERT-base
   batch-1 dense forward, where every weight is cold: 176-179 -> 162-164 ms. */
#define PREFETCH_PANEL_ROW(pf, k)                                                               \
    do {                                                                                        \
        for (int l = 0; l < NR_G; l += 16)                                                      \
            __builtin_prefetch((pf) + (int64_t)(k) * NR_G + l, 0, PF_LOCALITY);                 \
    } while (0)
#ifndef PF_SPREAD
#define PF_SPREAD 1
#endif
#if PF_SPREAD
#define PANEL_PREFETCH_STEP(k)                                                                  \
    do {                                                                                        \
        if (--pnext == 0) {                                                                     \
            pnext = pstep;                                                                      \
            if (pj < pfn) PREFETCH_PANEL_ROW(pf, pj);                                           \
            pj++;                                                                               \
        }                                                                                       \
    } while (0)
#else
#define PANEL_PREFETCH_STEP(k)                                                                  \
    do {                                                                                        \
        if ((k) < pfn) PREFETCH_PANEL_ROW(pf, (k));                                             \
    } while (0)
#endif
#ifndef PF_LOCALITY
#define PF_LOCALITY 3
#endif

#define DEFINE_UK(M)                                                                            \
static void uk##M(const float* a, int packed, int K, int lda, const float* b, float* c,       \
                  int64_t ldc, const float* bias, int ncols, int act, const float* pf, int pfn, \
                  int first, int last) {                                                       \
    vf acc[M][NV_G];                                                                           \
    /* spread: one of the pfn rows to prefetch every pstep iterations of k */                 \
    const int pstep = pfn > 0 ? K / pfn : K + 1;                                               \
    int pj = 0, pnext = 1;                                                                     \
    (void)pj; (void)pnext; (void)pstep;                                                        \
    for (int i = 0; i < M; i++)                                                                \
        for (int v = 0; v < NV_G; v++) acc[i][v] = (vf){0};                                    \
    if (!first) /* a later chunk of K: continue the partial sums in C */                      \
        for (int i = 0; i < M; i++) {                                                          \
            if (ncols == NR_G) {                                                               \
                for (int v = 0; v < NV_G; v++) acc[i][v] = *(const vf*)(c + i * ldc + v * VW); \
            } else {                                                                           \
                for (int j = 0; j < ncols; j++) acc[i][j / VW][j % VW] = c[i * ldc + j];       \
            }                                                                                  \
        }                                                                                      \
    if (packed) {                                                                              \
        for (int k = 0; k < K; k++) {                                                          \
            vf bv[NV_G];                                                                       \
            PANEL_PREFETCH_STEP(k);                                                            \
            for (int v = 0; v < NV_G; v++) bv[v] = *(const vf*)(b + (int64_t)k * NR_G + v * VW); \
            _Pragma("GCC unroll 16")                                                           \
            for (int i = 0; i < M; i++) {                                                      \
                const float av = a[(int64_t)k * M + i];                                        \
                for (int v = 0; v < NV_G; v++) acc[i][v] += av * bv[v];                        \
            }                                                                                  \
        }                                                                                      \
    } else {                                                                                   \
        for (int k = 0; k < K; k++) {                                                          \
            vf bv[NV_G];                                                                       \
            for (int v = 0; v < NV_G; v++) bv[v] = *(const vf*)(b + (int64_t)k * NR_G + v * VW); \
            PANEL_PREFETCH_STEP(k);                                                            \
            _Pragma("GCC unroll 16")                                                           \
            for (int i = 0; i < M; i++) {                                                      \
                const float av = a[(int64_t)i * lda + k];                                      \
                for (int v = 0; v < NV_G; v++) acc[i][v] += av * bv[v];                        \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    if (!first) bias = NULL;                                                                   \
    for (int i = 0; i < M; i++) {                                                              \
        float* ci = c + i * ldc;                                                               \
        if (ncols == NR_G) {                                                                   \
            for (int v = 0; v < NV_G; v++)                                                     \
                *(vf*)(ci + v * VW) = acc[i][v] + (bias ? *(const vf*)(bias + v * VW) : (vf){0}); \
        } else {                                                                               \
            for (int j = 0; j < ncols; j++)                                                    \
                ci[j] = acc[i][j / VW][j % VW] + (bias ? bias[j] : 0.f);                       \
        }                                                                                      \
        if (last) act_row(ci, ncols, act);                                                     \
    }                                                                                          \
}
DEFINE_UK(12)
DEFINE_UK(8)
DEFINE_UK(6)
DEFINE_UK(4)
DEFINE_UK(2)
DEFINE_UK(1)

static void uk_dispatch(int m, const float* a, int packed, int K, int lda, const float* b,
                        float* c, int64_t ldc, const float* bias, int ncols, int act,
                        const float* pf, int pfn, int first, int last) {
    switch (m) {
    case 12: uk12(a, packed, K, lda, b, c, ldc, bias, ncols, act, pf, pfn, first, last); break;
    case 8: uk8(a, packed, K, lda, b, c, ldc, bias, ncols, act, pf, pfn, first, last); break;
    case 6: uk6(a, packed, K, lda, b, c, ldc, bias, ncols, act, pf, pfn, first, last); break;
    case 4: uk4(a, packed, K, lda, b, c, ldc, bias, ncols, act, pf, pfn, first, last); break;
    case 2: uk2(a, packed, K, lda, b, c, ldc, bias, ncols, act, pf, pfn, first, last); break;
    default: uk1(a, packed, K, lda, b, c, ldc, bias, ncols, act, pf, pfn, first, last); break;
    }
}

/* Few rows (one or two sequences): panel-outer order, so that each weight panel (K * NR floats)
   is loaded into L2 once and used by every row block, instead of the whole weight matrix being
   streamed from L3 once per row block (which costs 10-30 % when other processes share the L3).
   X is packed once for all blocks when its stride aliases (xpack: T * K floats), else read. */
static void pack_rows(const float* x, int64_t t0, int m, int K, float* dst) {
    for (int k = 0; k < K; k++)
        for (int i = 0; i < m; i++) dst[(int64_t)k * m + i] = x[(t0 + i) * K + k];
}

/* K is cut into chunks of at most KC_G columns (the partial sums kept in Y between chunks), so
   that the rows of X a panel pass reads (T * KC_G floats) and the panel (KC_G * NR floats) stay in
   L2 together: at K = 3072 (BERT-base's FFN output), 128 rows of X are 1.5 MB and a whole-K
   panel 384 KB, more than a 2 MiB L2 holds beside everything else. Measured (AVX-512 Xeon, 1
   thread, cycling through 24 matrices of 3072 -> 768, 128 tokens): 126 GFLOP/s unchunked,
   134-135 with chunks of 2048, 140-144 with 1024; 384-wide and 768-wide K are one chunk. */
#ifndef KC_G
#define KC_G 1024
#endif
static void gemm_panels(const float* x, int64_t T, int K, const float* wp, int N, int p0, int p1,
                        const float* bias, float* y, int act, const float* xpack) {
    for (int k0 = 0; k0 < K; k0 += KC_G) {
        const int kc = K - k0 < KC_G ? K - k0 : KC_G;
        const int first = k0 == 0, last = k0 + kc == K;
        for (int p = p0; p < p1; p++) {
            const int n0 = p * NR_G, ncols = N - n0 < NR_G ? N - n0 : NR_G;
            const float* panel = wp + (int64_t)p * K * NR_G + (int64_t)k0 * NR_G;
            const float* next = p + 1 < p1 ? panel + (int64_t)K * NR_G : NULL;
            /* the next panel's kc rows are prefetched in slices, one per row block */
            const int64_t nblk = (T + MR_G - 1) / MR_G;
            const int pfn = (int)((kc + nblk - 1) / nblk);
            int pk = 0;
            for (int64_t t0 = 0; t0 < T; t0 += MR_G) {
                const int rows = T - t0 < MR_G ? (int)(T - t0) : MR_G;
                int done = 0;
                for (int s = 0; done < rows; s++) {
                    const int m = MR_SIZES[s];
                    for (; rows - done >= m; done += m) {
                        const int64_t r = t0 + done;
                        const int pn = next && pk < kc ? (kc - pk < pfn ? kc - pk : pfn) : 0;
                        /* packed rows: a block of m rows is k-major, its chunk at k0 * m */
                        const float* a = xpack ? xpack + r * K + (int64_t)k0 * m
                                               : x + r * K + k0;
                        uk_dispatch(m, a, xpack != NULL, kc, K, panel, y + r * N + n0, N,
                                    bias ? bias + n0 : NULL, ncols, act,
                                    pn ? next + (int64_t)pk * NR_G : NULL, pn, first, last);
                        pk += pn;
                    }
                }
            }
        }
    }
}

#ifndef FEW_ROW_BLOCKS
#define FEW_ROW_BLOCKS 32
#endif
/* Many rows (batches): groups of GROUP_SLABS row blocks, each job one group with all panels
   (panel-outer inside the group), so a weight panel serves 96 rows from L2 before the next is
   loaded, and the whole weight matrix is streamed once per group rather than once per row
   block; a group's output rows are LayerNorm-ed while still in L2. */
#define GROUP_SLABS 8

/* pack rows [0, rows) of x (row-major, K columns) in the sub-blocks gemm_panels walks through */
static void pack_group(const float* x, int64_t rows, int K, float* dst) {
    for (int64_t t0 = 0; t0 < rows; t0 += MR_G) {
        const int r = rows - t0 < MR_G ? (int)(rows - t0) : MR_G;
        int done = 0;
        for (int q = 0; done < r; q++)
            for (; r - done >= MR_SIZES[q]; done += MR_SIZES[q])
                pack_rows(x, t0 + done, MR_SIZES[q], K, dst + (t0 + done) * K);
    }
}

/* Scratch floats tl_gemm needs for T rows of K inputs on nthreads threads. */
int64_t tl_gemm_ws(int64_t T, int K, int nthreads) {
    const int64_t nslab = (T + MR_G - 1) / MR_G;
    if (nslab <= FEW_ROW_BLOCKS) return nslab * MR_G * (int64_t)K;
    return (int64_t)nthreads * GROUP_SLABS * MR_G * K;
}

/* ws: tl_gemm_ws(T, K, nthreads) floats. */
void tl_gemm(const float* x, int64_t T, int K, const float* wp, int N, const float* bias,
             float* y, int nthreads, int act, const float* res, const float* gamma,
             const float* beta, float eps, float* ws) {
    const int64_t nslab = (T + MR_G - 1) / MR_G;
    const int np = (N + NR_G - 1) / NR_G;
    const int packed = (K % 1024) == 0;
    if (nslab <= FEW_ROW_BLOCKS) {
        const int chunk = nthreads > 1 ? 2 : np;
        const int nchunk = (np + chunk - 1) / chunk;
        _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")
        {
            if (packed) {
                _Pragma("omp single")
                pack_group(x, T, K, ws);
            }
            _Pragma("omp for schedule(dynamic, 1)")
            for (int pc = 0; pc < nchunk; pc++) {
                const int p0 = pc * chunk, p1 = p0 + chunk < np ? p0 + chunk : np;
                gemm_panels(x, T, K, wp, N, p0, p1, bias, y, act, packed ? ws : NULL);
            }
            if (gamma) {
                _Pragma("omp for schedule(static)")
                for (int64_t t = 0; t < T; t++)
                    add_ln_row(y + t * N, res ? res + t * N : NULL, gamma, beta, N, eps);
            }
        }
        return;
    }
    const int64_t G = (int64_t)GROUP_SLABS * MR_G;
    const int64_t ngroups = (T + G - 1) / G;
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")
    {
        float* gpack = ws + (int64_t)omp_get_thread_num() * G * K;
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t g = 0; g < ngroups; g++) {
            const int64_t r0 = g * G, rows = T - r0 < G ? T - r0 : G;
            if (packed) pack_group(x + r0 * K, rows, K, gpack);
            gemm_panels(x + r0 * K, rows, K, wp, N, 0, np, bias, y + r0 * N, act,
                        packed ? gpack : NULL);
            if (gamma)
                for (int64_t t = r0; t < r0 + rows; t++)
                    add_ln_row(y + t * N, res ? res + t * N : NULL, gamma, beta, N, eps);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Attention for an encoder: out[b, t, h*d:(h+1)*d] = softmax_j(q.k_j * scale + kbias[b, j]) V,
 * with q, k, v read from token-major projections (row strides ldq, ldk, ldv floats; head h at
 * column h * d) and the context written token-major (row stride ldo). One job per (sequence,
 * head): K of the head is transposed once into Kt[d][Tp] (Tp: T rounded up to VW), then per
 * block of QB queries the scores are FMAs of broadcast q values with Kt rows, the softmax is
 * vectorised over keys, and P V is FMAs of broadcast probabilities with V rows.
 * kbias: additive per-key mask (0 or a large negative number), or NULL.
 * ws: nthreads * (d + QB) * Tp floats.
 * ------------------------------------------------------------------------------------------- */
#define QB 8

/* sc[a][c] rows for 4 queries x (4 key vectors) from q (row stride ldq) and kt (row stride Tp) */
#define SCORE_TILE(MQ, MC)                                                                      \
static inline void score_##MQ##_##MC(const float* qi, int64_t ldq, const float* kt, int Tp,    \
                                     int d, float* sc) {                                       \
    vf acc[MQ][MC];                                                                            \
    for (int a = 0; a < MQ; a++)                                                               \
        for (int c = 0; c < MC; c++) acc[a][c] = (vf){0};                                      \
    for (int e = 0; e < d; e++) {                                                              \
        vf kv[MC];                                                                             \
        for (int c = 0; c < MC; c++) kv[c] = *(const vf*)(kt + (int64_t)e * Tp + c * VW);      \
        for (int a = 0; a < MQ; a++) {                                                         \
            const float qa = qi[(int64_t)a * ldq + e];                                         \
            for (int c = 0; c < MC; c++) acc[a][c] += qa * kv[c];                              \
        }                                                                                      \
    }                                                                                          \
    for (int a = 0; a < MQ; a++)                                                               \
        for (int c = 0; c < MC; c++) *(vf*)(sc + (int64_t)a * Tp + c * VW) = acc[a][c];        \
}
SCORE_TILE(4, 4)
SCORE_TILE(1, 4)
SCORE_TILE(4, 1)
SCORE_TILE(1, 1)

/* out rows for MQ queries x (ME value vectors): sum_j p[a][j] v[j] */
#define CONTEXT_TILE(MQ, ME)                                                                    \
static inline void context_##MQ##_##ME(const float* p, int Tp, const float* vh, int64_t ldv,   \
                                       int T, float* o, int64_t ldo) {                         \
    vf acc[MQ][ME];                                                                            \
    for (int a = 0; a < MQ; a++)                                                               \
        for (int c = 0; c < ME; c++) acc[a][c] = (vf){0};                                      \
    for (int j = 0; j < T; j++) {                                                              \
        vf vv[ME];                                                                             \
        for (int c = 0; c < ME; c++) vv[c] = *(const vf*)(vh + (int64_t)j * ldv + c * VW);     \
        for (int a = 0; a < MQ; a++) {                                                         \
            const float pa = p[(int64_t)a * Tp + j];                                           \
            for (int c = 0; c < ME; c++) acc[a][c] += pa * vv[c];                              \
        }                                                                                      \
    }                                                                                          \
    for (int a = 0; a < MQ; a++)                                                               \
        for (int c = 0; c < ME; c++) *(vf*)(o + (int64_t)a * ldo + c * VW) = acc[a][c];        \
}
CONTEXT_TILE(4, 4)
CONTEXT_TILE(4, 2)
CONTEXT_TILE(8, 2)
CONTEXT_TILE(1, 4)
CONTEXT_TILE(1, 2)
CONTEXT_TILE(1, 1)
CONTEXT_TILE(4, 1)

/* out rows i0..i0+nq of one head, value columns [e0, e0 + me vectors) */
static void context_rows(const float* sc, int Tp, const float* vh, int64_t ldv, int T, float* oh,
                         int64_t ldo, int nq, int dv) {
    int i = 0;
    if (dv == 2)
        for (; i + 8 <= nq; i += 8) context_8_2(sc + (int64_t)i * Tp, Tp, vh, ldv, T, oh + i * ldo, ldo);
    for (; i + 4 <= nq; i += 4) {
        int e = 0;
        for (; e + 4 <= dv; e += 4)
            context_4_4(sc + (int64_t)i * Tp, Tp, vh + e * VW, ldv, T, oh + i * ldo + e * VW, ldo);
        for (; e + 2 <= dv; e += 2)
            context_4_2(sc + (int64_t)i * Tp, Tp, vh + e * VW, ldv, T, oh + i * ldo + e * VW, ldo);
        for (; e < dv; e++)
            context_4_1(sc + (int64_t)i * Tp, Tp, vh + e * VW, ldv, T, oh + i * ldo + e * VW, ldo);
    }
    for (; i < nq; i++) {
        int e = 0;
        for (; e + 4 <= dv; e += 4)
            context_1_4(sc + (int64_t)i * Tp, Tp, vh + e * VW, ldv, T, oh + i * ldo + e * VW, ldo);
        for (; e + 2 <= dv; e += 2)
            context_1_2(sc + (int64_t)i * Tp, Tp, vh + e * VW, ldv, T, oh + i * ldo + e * VW, ldo);
        for (; e < dv; e++)
            context_1_1(sc + (int64_t)i * Tp, Tp, vh + e * VW, ldv, T, oh + i * ldo + e * VW, ldo);
    }
}

void tl_attention(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                  int64_t ldv, int B, int T, int H, int d, const float* kbias, float scale,
                  float* out, int64_t ldo, float* ws, int nthreads) {
    const int Tp = (T + VW - 1) / VW * VW;
    const int nv = Tp / VW;
    const int dv = d / VW; /* d is a multiple of VW (checked by the caller) */
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")
    {
        /* per thread: kt [d][Tp], sc [QB][Tp], bias row [Tp] */
        float* kt = ws + (int64_t)omp_get_thread_num() * (d + QB + 1) * Tp;
        float* sc = kt + (int64_t)d * Tp;
        float* mb = sc + (int64_t)QB * Tp;
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t job = 0; job < (int64_t)B * H; job++) {
            const int b = (int)(job / H), h = (int)(job % H);
            const float* qh = q + (int64_t)b * T * ldq + (int64_t)h * d;
            const float* kh = k + (int64_t)b * T * ldk + (int64_t)h * d;
            const float* vh = v + (int64_t)b * T * ldv + (int64_t)h * d;
            float* oh = out + (int64_t)b * T * ldo + (int64_t)h * d;
            /* Kt: 8x8 transposes of K's head columns where whole blocks exist */
            int j = 0;
            if (d % 8 == 0)
                for (; j + 8 <= T; j += 8)
                    for (int e = 0; e < d; e += 8) {
                        v8 r[8];
                        for (int i = 0; i < 8; i++) r[i] = *(const v8*)(kh + (int64_t)(j + i) * ldk + e);
                        transpose8(r);
                        for (int i = 0; i < 8; i++) *(v8*)(kt + (int64_t)(e + i) * Tp + j) = r[i];
                    }
            for (; j < Tp; j++)
                for (int e = 0; e < d; e++)
                    kt[(int64_t)e * Tp + j] = j < T ? kh[(int64_t)j * ldk + e] : 0.f;
            /* key bias row: the mask, and a large negative number for padded keys */
            for (j = 0; j < Tp; j++)
                mb[j] = j < T ? (kbias ? kbias[(int64_t)b * T + j] : 0.f) : -3.402823466e38f;
            for (int i0 = 0; i0 < T; i0 += QB) {
                const int nq = T - i0 < QB ? T - i0 : QB;
                for (int i = 0; i < nq; ) {
                    const int mq = nq - i >= 4 ? 4 : 1;
                    const float* qi = qh + (int64_t)(i0 + i) * ldq;
                    float* si = sc + (int64_t)i * Tp;
                    int c = 0;
                    for (; c + 4 <= nv; c += 4) {
                        if (mq == 4) score_4_4(qi, ldq, kt + c * VW, Tp, d, si + c * VW);
                        else score_1_4(qi, ldq, kt + c * VW, Tp, d, si + c * VW);
                    }
                    for (; c < nv; c++) {
                        if (mq == 4) score_4_1(qi, ldq, kt + c * VW, Tp, d, si + c * VW);
                        else score_1_1(qi, ldq, kt + c * VW, Tp, d, si + c * VW);
                    }
                    i += mq;
                }
                /* softmax over keys, vectorised; padded keys come out exactly 0 */
                for (int i = 0; i < nq; i++) {
                    float* s = sc + (int64_t)i * Tp;
                    vf mx = vsplat(-3.402823466e38f);
                    for (int c = 0; c < nv; c++) {
                        vf x = *(const vf*)(s + c * VW) * scale + *(const vf*)(mb + c * VW);
                        *(vf*)(s + c * VW) = x;
                        mx = vsel(x > mx, x, mx);
                    }
                    float m = mx[0];
                    for (int l = 1; l < VW; l++) m = mx[l] > m ? mx[l] : m;
                    vf sum = {0};
                    for (int c = 0; c < nv; c++) {
                        vf e = vexp(*(const vf*)(s + c * VW) - m);
                        *(vf*)(s + c * VW) = e;
                        sum += e;
                    }
                    for (j = T; j < Tp; j++) sum[0] -= s[j], s[j] = 0.f;
                    const float inv = 1.0f / hsum(sum);
                    for (int c = 0; c < nv; c++) *(vf*)(s + c * VW) *= inv;
                }
                context_rows(sc, Tp, vh, ldv, T, oh + (int64_t)i0 * ldo, ldo, nq, dv);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * A whole post-LayerNorm encoder layer in one call (issue 14): the six products on their
 * calibrated kernels, attention, and the fused epilogues, exactly the sequence that
 * ticketlab/sparse/fused.py would otherwise issue as seven calls from Python. Why: at MiniLM's
 * size each call from Python costs ~20 us of interpreter work around it, and a layer measured
 * ~0.38 ms slower than its own seven kernel calls replayed from a list (2.75 against 2.35 ms,
 * MiniLM batch 1 at 70 % on a Xeon): ~14 % of the layer.
 *
 * prog: 6 product descriptors of TL_P_SLOTS int64 each (query, key, value, attention output,
 * FFN in, FFN out), then heads, head size, activation, and the pointers gamma1, beta1, gamma2,
 * beta2. fparams: scale, eps1, eps2. A descriptor's kind is 0 for ticketlab's dense GEMM
 * (w: packed panels) or the token block of a sparse variant (w: row pointers). ws: enough
 * floats for the largest product's or the attention's workspace (the calls run one after
 * another and share it).
 * ------------------------------------------------------------------------------------------- */
enum { P_KIND, P_THREADS, P_N, P_K, P_KC, P_NCB, P_NGROUPS, P_BIAS, P_W, P_IDX, P_VAL, P_GROWS,
       P_TGROUP, P_SPTR, P_SIDX, P_SVAL, TL_P_SLOTS };

int tl_product_slots(void) { return TL_P_SLOTS; }

static void run_product(const int64_t* d, const float* x, int64_t T, float* y, int act,
                        const float* res, const float* gamma, const float* beta, float eps,
                        float* ws) {
#define SLOT(i, type) ((type)(intptr_t)d[i])
    const int K = (int)d[P_K], N = (int)d[P_N], th = (int)d[P_THREADS];
    const float* bias = SLOT(P_BIAS, const float*);
#define SPMM_CALL(TB)                                                                           \
    tl_spmm_tb##TB(x, T, K, ws, (int)d[P_KC], (int)d[P_NCB], SLOT(P_W, const int32_t*),          \
                   SLOT(P_IDX, const int16_t*), SLOT(P_VAL, const float*),                      \
                   SLOT(P_GROWS, const int32_t*), SLOT(P_TGROUP, const int32_t*),               \
                   SLOT(P_SPTR, const int32_t*), SLOT(P_SIDX, const int16_t*),                  \
                   SLOT(P_SVAL, const float*), (int)d[P_NGROUPS], N, bias, y, th, act, res,     \
                   gamma, beta, eps)
    switch (d[P_KIND]) {
    case 16: SPMM_CALL(16); break;
    case 32: SPMM_CALL(32); break;
    case 64: SPMM_CALL(64); break;
    case 128: SPMM_CALL(128); break;
    default:
        tl_gemm(x, T, K, SLOT(P_W, const float*), N, bias, y, th, act, res, gamma, beta, eps,
                ws);
    }
#undef SPMM_CALL
#undef SLOT
}

void tl_encoder_layer(const int64_t* prog, const float* fparams, const float* x, int B, int T,
                      const float* kbias, float* q, float* k, float* v, float* ctx, float* a,
                      float* ffn, float* y, float* ws, int nthreads) {
    const int64_t* p = prog;
    const int64_t* tail = prog + 6 * TL_P_SLOTS;
    const int H = (int)tail[0], d = (int)tail[1], act = (int)tail[2];
    const float *g1 = (const float*)(intptr_t)tail[3], *b1 = (const float*)(intptr_t)tail[4];
    const float *g2 = (const float*)(intptr_t)tail[5], *b2 = (const float*)(intptr_t)tail[6];
    const int64_t n = (int64_t)B * T, w = (int64_t)H * d;
    run_product(p, x, n, q, 0, NULL, NULL, NULL, 0.f, ws);
    run_product(p + TL_P_SLOTS, x, n, k, 0, NULL, NULL, NULL, 0.f, ws);
    run_product(p + 2 * TL_P_SLOTS, x, n, v, 0, NULL, NULL, NULL, 0.f, ws);
    tl_attention(q, w, k, w, v, w, B, T, H, d, kbias, fparams[0], ctx, w, ws, nthreads);
    run_product(p + 3 * TL_P_SLOTS, ctx, n, a, 0, x, g1, b1, fparams[1], ws);
    run_product(p + 4 * TL_P_SLOTS, a, n, ffn, act, NULL, NULL, NULL, 0.f, ws);
    run_product(p + 5 * TL_P_SLOTS, ffn, n, y, 0, a, g2, b2, fparams[2], ws);
}
