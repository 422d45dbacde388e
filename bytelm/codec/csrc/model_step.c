/* The model's forward step for compression, with every floating-point operation in a fixed order, so that any
 * build of this file on any machine (any compiler flags that keep IEEE semantics, any SIMD width, any thread
 * count) computes bit-identical counts. Loaded by bytelm/codec/model_step.py (which documents the interface)
 * through bytelm/infer/native.py; tests/test_model_step.py builds it three ways and compares.
 *
 * What makes it deterministic:
 *   - Built with -ffp-contract=off and without -ffast-math: every a * b + c is a rounded product, then a
 *     rounded sum (no FMA contraction), and nothing is reassociated. FLT_EVAL_METHOD must be 0 (no x87 excess
 *     precision); the entry sets the default floating-point environment (round to nearest, no flush-to-zero)
 *     in every thread, whatever the caller's.
 *   - Matrix products sum each output element in one chain, column 0 first: Y[r][n] = ((0 + X[r][0] W[0][n])
 *     + X[r][1] W[1][n]) + ... . The SIMD lanes run over outputs n (the weights are stored transposed, (K, N)),
 *     never over the sum, so the vector width changes nothing. Attention scores do the same over positions.
 *   - Other sums (RMSNorm's squares, the softmaxes' totals) use eight partial sums, element i into sum i % 8,
 *     combined by one fixed tree (sum8): a compiler may put the eight lanes in one vector or two, not reorder.
 *   - exp is this file's (exp_f: Cody-Waite reduction and a fixed polynomial); sqrt and division are IEEE's
 *     correctly rounded operations; the rotary tables come from this file's double-precision sin, cos, exp and
 *     log (detstep_rope). No C library function whose last bit may differ between libms is called.
 *   - Rows are independent: each row's arithmetic is the same whichever thread runs it and whoever its
 *     neighbours are, so threads split the rows and never meet.
 *
 * Layouts (row-major, float32, contiguous; L layers, C width, H heads, D = C / H, F MLP width, V = 256, T the
 * context): embed (V, C); value_embed (V, L, C) or NULL; norm1, norm2 (L, C); w_qkv (L, C, 3C); w_proj (L, C, C);
 * w_fc (L, C, F); w_out (L, F, C); norm_f (C); head (C, V); rope_cos, rope_sin (T, D / 2);
 * keys (R, L, H, D, T) (transposed: a head's scores read positions contiguously); values (R, L, H, T, D).
 */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <fenv.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "model_step.c needs FLT_EVAL_METHOD == 0 (float arithmetic in float: SSE2, NEON, ...)"
#endif

#define MAX_THREADS 256
#define COUNT_BITS 16

typedef struct {
    int32_t n_layer, C, H, F, V, context, value_embeds;
    float eps, qk_eps;
    const float *embed, *value_embed, *norm1, *w_qkv, *w_proj, *norm2, *w_fc, *w_out, *norm_f, *head;
    const float *rope_cos, *rope_sin;
    int64_t embed_size, value_embed_size, norm1_size, w_qkv_size, w_proj_size, norm2_size, w_fc_size,
        w_out_size, norm_f_size, head_size, rope_cos_size, rope_sin_size;
} DetModel;

typedef struct {
    int32_t rows, tokens, pos, threads;  /* feed tokens[r][j] at position pos + j, j < tokens */
    const uint8_t *token;                /* (rows, tokens) */
    float *keys, *values;                /* (rows, L, H, D, T), (rows, L, H, T, D) */
    uint32_t *counts;                    /* (rows, V) for the byte after the last token, or NULL */
    int64_t token_size, keys_size, values_size, counts_size;
    char error[200];
} DetCall;

size_t detstep_model_size(void) { return sizeof(DetModel); }
size_t detstep_call_size(void) { return sizeof(DetCall); }

/* ---- arithmetic ---- */

/* The sum of x[0..n) (of x[i] * x[i] when `squares`): eight partial sums combined by one fixed tree. */
static float sum8(const float *restrict x, int n, int squares) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) a[j] = a[j] + (squares ? x[i + j] * x[i + j] : x[i + j]);
    for (int j = 0; i + j < n; j++) a[j] = a[j] + (squares ? x[i + j] * x[i + j] : x[i + j]);
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* e^x for x <= 0 (0 below -87, where e^x would be subnormal): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
 * polynomial to r^7 (relative error < 2e-7 before rounding), times 2^n by building the exponent. */
static inline float exp_f(float x) {
    const float xc = x > -87.0f ? x : -87.0f;  /* no branch, so a loop of exp_f vectorises */
    const float shifter = 12582912.0f;  /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    float n = (xc * 1.44269504f + shifter) - shifter;
    float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  /* ln 2 in two parts: the first times n is exact */
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } scale = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return x > -87.0f ? p * scale.f : 0.0f;
}

/* Double-precision e^x, ln x, sin, cos for the rotary tables (once per step object, so speed is no concern). */
static double exp_d(double x) {
    double n = (x * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;  /* 1.5 * 2^52 */
    double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;  /* fdlibm's ln2 hi, lo */
    double p = 1.0, term = 1.0;
    for (int k = 1; k <= 16; k++) { term = term * r / (double)k; p = p + term; }
    union { uint64_t u; double f; } scale = {.u = (uint64_t)((int64_t)n + 1023) << 52};
    return p * scale.f;
}

static double log_d(double x) {  /* x > 0 and normal */
    union { double f; uint64_t u; } v = {.f = x};
    int e = (int)((v.u >> 52) & 0x7ff) - 1023;
    v.u = (v.u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;  /* m in [1, 2) */
    double m = v.f;
    if (m > 1.4142135623730951) { m = m * 0.5; e = e + 1; }
    double s = (m - 1.0) / (m + 1.0), s2 = s * s, sum = 0.0;  /* ln m = 2 atanh(s), |s| < 0.172 */
    for (int k = 31; k >= 1; k -= 2) sum = sum * s2 + 1.0 / (double)k;
    return (double)e * 6.93147180369123816490e-01 + ((double)e * 1.90821492927058770002e-10 + 2.0 * s * sum);
}

/* sin and cos of a >= 0 (a < 2^20): a = k pi/2 + r, |r| <= pi/4, by fdlibm's three-part pi/2, then series. */
static void sincos_d(double a, double *s_out, double *c_out) {
    double k = (a * 6.36619772367581382433e-01 + 6755399441055744.0) - 6755399441055744.0;
    double r = ((a - k * 1.57079632673412561417e+00) - k * 6.07710050630396597660e-11)
               - k * 2.02226624871116645580e-21;
    double r2 = r * r, s = 0.0, c = 0.0;
    for (int j = 12; j >= 0; j--) {  /* sin r = sum (-1)^j r^(2j+1) / (2j+1)!, cos likewise with (2j)! */
        double fs = 1.0, fc = 1.0;
        for (int i = 2; i <= 2 * j + 1; i++) { fs = fs * (double)i; if (i <= 2 * j) fc = fc * (double)i; }
        s = s * r2 + ((j & 1) ? -1.0 : 1.0) / fs;
        c = c * r2 + ((j & 1) ? -1.0 : 1.0) / fc;
    }
    s = s * r;
    switch ((int64_t)k & 3) {
        case 0: *s_out = s; *c_out = c; break;
        case 1: *s_out = c; *c_out = -s; break;
        case 2: *s_out = -s; *c_out = -c; break;
        default: *s_out = -c; *c_out = s; break;
    }
}

/* Rotary tables (T, half) as ByteLM builds them: inv_freq_i = 1 / base^(i / half) and angle = pos * inv_freq_i
 * in float32, then cos and sin of that float angle, rounded to float. */
int detstep_rope(float *cos_out, float *sin_out, int64_t size, int32_t T, int32_t half, double base) {
    if (T < 1 || half < 1 || size != (int64_t)T * half || !(base > 1.0) || !(base < 1e300) || T > (1 << 20))
        return -1;
    fenv_t saved;
    fegetenv(&saved);
    fesetenv(FE_DFL_ENV);
    double log_base = log_d(base);
    for (int i = 0; i < half; i++) {
        float inv = (float)(1.0 / (double)(float)exp_d((double)(float)((double)i / (double)half) * log_base));
        for (int t = 0; t < T; t++) {
            double s, c;
            sincos_d((double)((float)t * inv), &s, &c);
            cos_out[(int64_t)t * half + i] = (float)c;
            sin_out[(int64_t)t * half + i] = (float)s;
        }
    }
    fesetenv(&saved);
    return 0;
}

/* Eight floats that the compiler maps onto whatever vectors the target has (one AVX register, two SSE or NEON
 * ones, or eight scalars at -O0): each lane is its own IEEE operation, so the results are the same. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  /* for loads and stores at any float */

/* Y (rows, N) = X (rows, K) @ W (K, N), each element one chain over k (see the top). Four rows by sixteen
 * columns at a time, their 64 sums in eight vector registers while W's (K, 16) panel is read once per four
 * rows. When `add`, Y = Y + that product (the residual), added after the chain. */
static void matmul_block(const float *restrict X, int rows, int K, const float *restrict W, int N,
                         float *restrict Y, int add) {
    int n0 = 0;
    for (; n0 + 16 <= N; n0 += 16) {
        int r0 = 0;
        for (; r0 + 4 <= rows; r0 += 4) {
            v8 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
            const float *restrict x0 = X + (size_t)r0 * K, *restrict x1 = x0 + K, *restrict x2 = x1 + K,
                        *restrict x3 = x2 + K;
            for (int k = 0; k < K; k++) {
                const float *w = W + (size_t)k * N + n0;
                const v8 w0 = *(const v8u *)w, w1 = *(const v8u *)(w + 8);
                a00 = a00 + x0[k] * w0; a01 = a01 + x0[k] * w1;
                a10 = a10 + x1[k] * w0; a11 = a11 + x1[k] * w1;
                a20 = a20 + x2[k] * w0; a21 = a21 + x2[k] * w1;
                a30 = a30 + x3[k] * w0; a31 = a31 + x3[k] * w1;
            }
            v8 acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
            for (int i = 0; i < 4; i++)
                for (int h = 0; h < 2; h++) {
                    v8u *y = (v8u *)(Y + (size_t)(r0 + i) * N + n0 + 8 * h);
                    *y = add ? *y + acc[2 * i + h] : acc[2 * i + h];
                }
        }
        for (; r0 < rows; r0++) {
            v8 a0 = {0}, a1 = {0};
            const float *restrict x = X + (size_t)r0 * K;
            for (int k = 0; k < K; k++) {
                const float *w = W + (size_t)k * N + n0;
                a0 = a0 + x[k] * *(const v8u *)w;
                a1 = a1 + x[k] * *(const v8u *)(w + 8);
            }
            v8u *y = (v8u *)(Y + (size_t)r0 * N + n0);
            y[0] = add ? y[0] + a0 : a0;
            y[1] = add ? y[1] + a1 : a1;
        }
    }
    for (; n0 < N; n0++)  /* columns past the last multiple of 16: one chain each, in the same order */
        for (int r = 0; r < rows; r++) {
            float a = 0.0f;
            for (int k = 0; k < K; k++) a = a + X[(size_t)r * K + k] * W[(size_t)k * N + n0];
            Y[(size_t)r * N + n0] = add ? Y[(size_t)r * N + n0] + a : a;
        }
}

/* matmul_block over blocks of 32 rows: a re-encode multiplies thousands of rows, and a block's rows stay in
 * the L1 and L2 caches while every panel of W passes (the blocks change no sum). */
static void matmul(const float *restrict X, int rows, int K, const float *restrict W, int N, float *restrict Y,
                   int add) {
    for (int r0 = 0; r0 < rows; r0 += 32)
        matmul_block(X + (size_t)r0 * K, rows - r0 < 32 ? rows - r0 : 32, K, W, N, Y + (size_t)r0 * N, add);
}

/* out (n) = x / sqrt(mean(x^2) + eps) * w (w may be NULL: no weight), as torch's RMSNorm orders it. */
static void rms_norm(const float *restrict x, const float *restrict w, float *restrict out, int n, float eps) {
    float r = 1.0f / sqrtf(sum8(x, n, 1) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w ? (x[i] * r) * w[i] : x[i] * r;
}

/* ---- the forward ---- */

typedef struct {
    const DetModel *m;
    const DetCall *c;
    int row0, rows;
    int failed;
} Job;

typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  /* static functions pass v8 by value: no ABI crosses a library edge */
#endif

/* exp_f on eight lanes with the same operations in the same order (so the same bits), written with vector
 * types because GCC does not vectorise exp_f's loop by itself. */
static inline v8 exp8(v8 x) {
    const v8 low = (v8){0} - 87.0f;
    const v8i keep = x > low;  /* all ones where x > -87; 0 there and for NaN */
    const v8 xc = (v8)(((v8i)x & keep) | ((v8i)low & ~keep));
    const v8 shifter = (v8){0} + 12582912.0f;
    v8 n = (xc * 1.44269504f + shifter) - shifter;
    v8 r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    v8 p = (v8){0} + 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const v8 scale = (v8)((__builtin_convertvector(n, v8i) + 127) << 23);
    return (v8)((v8i)(p * scale) & keep);
}

/* x[i] = exp_f(x[i] - top) for i < n */
static void exp_shifted(float *restrict x, int n, float top) {
    int i = 0;
    for (; i + 8 <= n; i += 8) *(v8u *)(x + i) = exp8(*(const v8u *)(x + i) - top);
    for (; i < n; i++) x[i] = exp_f(x[i] - top);
}

/* Accumulate, for lanes of LANES (a multiple of 8, at most 64) floats, acc[lane] = acc[lane] + a[i] * b_i[lane]
 * over i < n in order, b_i = b + i * step: one chain per lane, LANES / 8 chains in flight to hide the adds'
 * latency. The lanes are outputs, never parts of one sum, so the vector width changes nothing. */
#define CHAINS(LANES)                                                                                          \
    static inline void chains##LANES(const float *restrict a, const float *restrict b, size_t step, int n,    \
                                     float *restrict out) {                                                    \
        v8 acc[LANES / 8];                                                                                     \
        for (int j = 0; j < LANES / 8; j++) acc[j] = (v8){0};                                                  \
        for (int i = 0; i < n; i++)                                                                            \
            for (int j = 0; j < LANES / 8; j++) acc[j] = acc[j] + a[i] * *(const v8u *)(b + i * step + 8 * j); \
        for (int j = 0; j < LANES / 8; j++) *(v8u *)(out + 8 * j) = acc[j];                                    \
    }
CHAINS(64)
CHAINS(32)
CHAINS(24)
CHAINS(16)
CHAINS(8)

/* out[l] = sum over i < n of a[i] * b[i * step + l] for l < lanes, each one chain over i in order: the widest
 * blocks of chains first, then a scalar chain per lane left over. */
static void lanes_sum(const float *restrict a, const float *restrict b, size_t step, int n, int lanes,
                      float *restrict out) {
    int l = 0;
    for (; l + 64 <= lanes; l += 64) chains64(a, b + l, step, n, out + l);
    if (l + 32 <= lanes) { chains32(a, b + l, step, n, out + l); l += 32; }
    if (l + 24 <= lanes) { chains24(a, b + l, step, n, out + l); l += 24; }
    if (l + 16 <= lanes) { chains16(a, b + l, step, n, out + l); l += 16; }
    if (l + 8 <= lanes) { chains8(a, b + l, step, n, out + l); l += 8; }
    for (; l < lanes; l++) {
        float acc = 0.0f;
        for (int i = 0; i < n; i++) acc = acc + a[i] * b[i * step + l];
        out[l] = acc;
    }
}

/* One head's attention for a query at position p: y (D) = softmax(q . k_t / sqrt(D)) . v_t over t <= p.
 * kt (D, T) this head's keys, transposed; vt (T, D); s (T) scratch. */
static void attend(const float *restrict q, const float *restrict kt, const float *restrict vt, int p, int D,
                   int T, float scale, float *restrict s, float *restrict y) {
    int n = p + 1;
    lanes_sum(q, kt, (size_t)T, D, n, s);  /* s[t] = q . k_t: lanes are positions, the chain runs over d */
    float top = s[0] * scale;
    for (int t = 0; t < n; t++) { s[t] = s[t] * scale; top = s[t] > top ? s[t] : top; }
    exp_shifted(s, n, top);
    const float inv = 1.0f / sum8(s, n, 0);
    lanes_sum(s, vt, (size_t)D, n, D, y);  /* y[d] = sum_t e_t v_t[d]: lanes are d, the chain runs over t */
    for (int d = 0; d < D; d++) y[d] = y[d] * inv;
}

/* Counts (V) from logits (V): e_i = exp(l_i - max), c_i = 1 + floor(e_i * (2^16 - V) / sum e), and what the
 * floors leave (or, by rounding, overdraw) goes to the first largest count. */
static void quantize(const float *restrict logits, int V, float *restrict e, uint32_t *restrict counts) {
    float top = logits[0];
    for (int i = 1; i < V; i++) top = logits[i] > top ? logits[i] : top;
    memcpy(e, logits, sizeof(float) * V);
    exp_shifted(e, V, top);
    const float sum = sum8(e, V, 0);
    if (!(sum >= 1.0f && sum <= (float)V)) {  /* NaN or infinite logits: a uniform distribution */
        for (int i = 0; i < V; i++) counts[i] = (1u << COUNT_BITS) / (uint32_t)V;
        return;
    }
    const float scale = (float)((1 << COUNT_BITS) - V) / sum;
    int64_t total = 0;
    int best = 0;
    for (int i = 0; i < V; i++) {
        counts[i] = 1u + (uint32_t)(e[i] * scale);
        total += counts[i];
        if (counts[i] > counts[best]) best = i;
    }
    counts[best] = (uint32_t)((int64_t)counts[best] + ((1 << COUNT_BITS) - total));
}

/* Rows row0 .. row0 + rows of the call, every token, layer by layer over (rows x tokens) vectors at once. */
static void *run_rows(void *arg) {
    Job *job = arg;
    const DetModel *m = job->m;
    const DetCall *c = job->c;
    fenv_t saved;
    fegetenv(&saved);
    fesetenv(FE_DFL_ENV);
    const int L = m->n_layer, C = m->C, H = m->H, D = C / H, F = m->F, V = m->V, T = m->context, half = D / 2;
    const int J = c->tokens, N = job->rows * J;  /* vectors: row-major over (row, token) */
    const int want = c->counts != NULL;
    const float scale = 1.0f / sqrtf((float)D);
    float *buf = malloc(sizeof(float) * ((size_t)N * (3 * C + 3 * C + F) + T + V + (size_t)job->rows * V));
    if (!buf) { job->failed = 1; fesetenv(&saved); return NULL; }
    float *x = buf, *h = x + (size_t)N * C, *y = h + (size_t)N * C, *qkv = y + (size_t)N * C;
    float *mid = qkv + (size_t)N * 3 * C, *s = mid + (size_t)N * F, *e = s + T, *logits = e + V;
    for (int v = 0; v < N; v++) {
        int r = job->row0 + v / J, j = v % J;
        memcpy(x + (size_t)v * C, m->embed + (size_t)c->token[(size_t)r * J + j] * C, sizeof(float) * C);
    }
    for (int l = 0; l < L; l++) {
        const int last = l == L - 1 && !want;  /* only the keys and values of the last layer are needed */
        for (int v = 0; v < N; v++) rms_norm(x + (size_t)v * C, m->norm1 + (size_t)l * C, h + (size_t)v * C, C, m->eps);
        matmul(h, N, C, m->w_qkv + (size_t)l * C * 3 * C, 3 * C, qkv, 0);
        for (int v = 0; v < N; v++) {
            int r = job->row0 + v / J, j = v % J, p = c->pos + j;
            float *q = qkv + (size_t)v * 3 * C, *k = q + C, *val = q + 2 * C;
            const float *cs = m->rope_cos + (size_t)p * half, *sn = m->rope_sin + (size_t)p * half;
            if (m->value_embed) {
                const float *ve = m->value_embed + ((size_t)c->token[(size_t)r * J + j] * L + l) * C;
                for (int i = 0; i < C; i++) val[i] = val[i] + ve[i];
            }
            for (int hd = 0; hd < 2 * H; hd++) {  /* QK-norm, then rotary, on each head of q and of k */
                float *u = q + (size_t)hd * D;
                rms_norm(u, NULL, u, D, m->qk_eps);
                for (int i = 0; i < half; i++) {
                    float x1 = u[i], x2 = u[i + half];
                    u[i] = x1 * cs[i] + x2 * sn[i];
                    u[i + half] = x2 * cs[i] - x1 * sn[i];
                }
            }
            float *kc = c->keys + (((size_t)r * L + l) * H) * D * T;
            float *vc = c->values + (((size_t)r * L + l) * H) * T * D;
            for (int hd = 0; hd < H; hd++)
                for (int i = 0; i < D; i++) {
                    kc[((size_t)hd * D + i) * T + p] = k[hd * D + i];
                    vc[((size_t)hd * T + p) * D + i] = val[hd * D + i];
                }
        }
        if (last) break;
        for (int v = 0; v < N; v++) {  /* keys up to each vector's position are all stored by now */
            int r = job->row0 + v / J, p = c->pos + v % J;
            const float *kc = c->keys + (((size_t)r * L + l) * H) * D * T;
            const float *vc = c->values + (((size_t)r * L + l) * H) * T * D;
            for (int hd = 0; hd < H; hd++)
                attend(qkv + (size_t)v * 3 * C + hd * D, kc + (size_t)hd * D * T, vc + (size_t)hd * T * D, p, D, T,
                       scale, s, y + (size_t)v * C + hd * D);
        }
        matmul(y, N, C, m->w_proj + (size_t)l * C * C, C, x, 1);
        for (int v = 0; v < N; v++) rms_norm(x + (size_t)v * C, m->norm2 + (size_t)l * C, h + (size_t)v * C, C, m->eps);
        matmul(h, N, C, m->w_fc + (size_t)l * C * F, F, mid, 0);
        for (size_t i = 0; i < (size_t)N * F; i++) mid[i] = mid[i] > 0.0f ? mid[i] * mid[i] : 0.0f;  /* ReLU^2 */
        matmul(mid, N, F, m->w_out + (size_t)l * F * C, C, x, 1);
    }
    if (want) {  /* the last token of each row: all rows' logits in one product, which reads the head once */
        for (int i = 0; i < job->rows; i++)
            rms_norm(x + ((size_t)i * J + J - 1) * C, m->norm_f, h + (size_t)i * C, C, m->eps);
        matmul(h, job->rows, C, m->head, V, logits, 0);
        for (int i = 0; i < job->rows; i++)
            quantize(logits + (size_t)i * V, V, e, c->counts + (size_t)(job->row0 + i) * V);
    }
    free(buf);
    fesetenv(&saved);
    return NULL;
}

static int refuse(DetCall *c, const char *why) {
    snprintf(c->error, sizeof c->error, "%s", why);
    return -1;
}

/* Feed every row its tokens (see DetCall) and, when counts is set, write the counts of the byte after the last.
 * Returns 0, or -1 with the reason in c->error (nothing written when the sizes are wrong). */
int detstep_forward(const DetModel *m, DetCall *c) {
    const int64_t L = m->n_layer, C = m->C, H = m->H, F = m->F, V = m->V, T = m->context;
    if (L < 1 || C < 2 || H < 1 || C % H || (C / H) % 2 || F < 1 || V != 256 || T < 1 || L > 256 || C > 16384
        || F > 262144 || T > (1 << 20))
        return refuse(c, "model dimensions out of range");
    const int64_t half = C / H / 2;
    if (!m->embed || m->embed_size != V * C || !m->norm1 || m->norm1_size != L * C || !m->norm2
        || m->norm2_size != L * C || !m->w_qkv || m->w_qkv_size != L * C * 3 * C || !m->w_proj
        || m->w_proj_size != L * C * C || !m->w_fc || m->w_fc_size != L * C * F || !m->w_out
        || m->w_out_size != L * F * C || !m->norm_f || m->norm_f_size != C || !m->head || m->head_size != C * V
        || !m->rope_cos || m->rope_cos_size != T * half || !m->rope_sin || m->rope_sin_size != T * half
        || (m->value_embed ? m->value_embed_size != V * L * C : m->value_embed_size != 0))
        return refuse(c, "a weight's size does not match the model's dimensions");
    if (c->rows < 1 || c->tokens < 1 || c->pos < 0 || (int64_t)c->pos + c->tokens > T || c->threads < 1
        || c->threads > MAX_THREADS)
        return refuse(c, "rows, tokens, position or threads out of range");
    const int64_t R = c->rows;
    if (!c->token || c->token_size != R * c->tokens || !c->keys || c->keys_size != R * L * C * T || !c->values
        || c->values_size != R * L * C * T || (c->counts ? c->counts_size != R * V : c->counts_size != 0))
        return refuse(c, "a buffer's size does not match the rows, tokens and model");
    int n = c->threads < c->rows ? c->threads : c->rows;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < n; t++) {
        int lo = (int)(R * t / n), hi = (int)(R * (t + 1) / n);
        jobs[t] = (Job){m, c, lo, hi - lo, 0};
        if (t > 0) started[t] = pthread_create(&ids[t], NULL, run_rows, &jobs[t]) == 0;
        if (t > 0 && !started[t]) run_rows(&jobs[t]);  /* no thread to be had: the same work, here */
    }
    run_rows(&jobs[0]);
    int failed = jobs[0].failed;
    for (int t = 1; t < n; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        failed |= jobs[t].failed;
    }
    return failed ? refuse(c, "out of memory for the step's scratch") : 0;
}
