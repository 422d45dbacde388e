/* One-byte decode step of ByteLM in plain C (fp32, batch 1, one thread).
 *
 * The same arithmetic as bytelm/decode.py's torch path (and so as ByteLM.forward with a KV cache), in one
 * call: at batch 1 a step is ~25 small matrix-vector products plus ~150 elementwise operations, and in torch
 * each of those costs microseconds of dispatch. Here the step is bounded by reading the weights once.
 *
 * Built and loaded by bytelm/native.py (gcc or cc, -O3 -march=native -fopenmp-simd); tests/test_decode.py
 * checks it against the reference. Layouts (all row-major, contiguous, float32):
 *   embed (V, C); w_qkv (L, 3C, C); w_proj (L, C, C); w_fc (L, F, C); w_out (L, C, F); head (V, C)
 *   (the last five float, or IEEE half when `half` is set: see bytelm_half_supported)
 *   rope_cos, rope_sin (T, 2, D): per position, a row for queries (scaled by 1/sqrt(D)) and one for keys
 *   k_cache, v_cache (L, H, max_len, D): the KVCache tensors of batch 1
 *   scratch: at least 5C + max(F, max_len) floats; logits (V)
 * RMSNorm weights are already folded into w_qkv, w_fc and head (see decode.py).
 */
#include <math.h>
#include <stddef.h>

/* y (rows) = W (rows, cols) @ x (cols) [+ y if accumulate]. Four rows at a time: four independent sums
 * keep the vector units busy while the next rows stream in from memory. */
static void matvec(const float *restrict w, const float *restrict x, float *restrict y,
                   int rows, int cols, int accumulate) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *restrict w0 = w + (size_t)r * cols, *restrict w1 = w0 + cols;
        const float *restrict w2 = w1 + cols, *restrict w3 = w2 + cols;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int c = 0; c < cols; c++) {
            a0 += w0[c] * x[c]; a1 += w1[c] * x[c]; a2 += w2[c] * x[c]; a3 += w3[c] * x[c];
        }
        if (accumulate) { y[r] += a0; y[r + 1] += a1; y[r + 2] += a2; y[r + 3] += a3; }
        else { y[r] = a0; y[r + 1] = a1; y[r + 2] = a2; y[r + 3] = a3; }
    }
    for (; r < rows; r++) {
        const float *restrict row = w + (size_t)r * cols;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int c = 0; c < cols; c++) acc += row[c] * x[c];
        y[r] = accumulate ? y[r] + acc : acc;
    }
}

#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_HALF 1

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* matvec with W stored as IEEE half precision (F16C converts 8 at a time to float; sums stay in float):
 * half the bytes to read, and reading the weights is what bounds a step (docs/generation.md). */
static void matvec_half(const unsigned short *restrict w, const float *restrict x, float *restrict y,
                        int rows, int cols, int accumulate) {
    const int vec_cols = cols & ~7;
    for (int r = 0; r < rows; r += 4) {
        const int n = rows - r < 4 ? rows - r : 4;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int c = 0; c < vec_cols; c += 8) {
            const __m256 xv = _mm256_loadu_ps(x + c);
            for (int j = 0; j < n; j++) {  /* unrolled by the compiler for n == 4 */
                const __m128i half8 = _mm_loadu_si128((const __m128i *)(w + (size_t)(r + j) * cols + c));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtph_ps(half8), xv, acc[j]);
            }
        }
        for (int j = 0; j < n; j++) {
            float total = sum8(acc[j]);
            for (int c = vec_cols; c < cols; c++) total += _cvtsh_ss(w[(size_t)(r + j) * cols + c]) * x[c];
            y[r + j] = accumulate ? y[r + j] + total : total;
        }
    }
}
#else
#define HAVE_HALF 0
#endif

/* Whether this build can take half-precision weights (x86 with F16C and FMA: bytelm_decode_step's `half`). */
int bytelm_half_supported(void) { return HAVE_HALF; }

/* The weight matrices are float, or half (unsigned short bits) when `half` is set; `offset` in elements. */
static void weight_matvec(const void *w, size_t offset, int half, const float *restrict x, float *restrict y,
                          int rows, int cols, int accumulate) {
#if HAVE_HALF
    if (half) { matvec_half((const unsigned short *)w + offset, x, y, rows, cols, accumulate); return; }
#endif
    matvec((const float *)w + offset, x, y, rows, cols, accumulate);
}

/* out = x / sqrt(mean(x^2) + eps), no weight (folded into the next matrix) */
static void rms_norm(const float *restrict x, float *restrict out, int n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r;
}

/* e^x for the attention weights. libm's expf is a scalar call (one per head and cached position, which made
 * it most of a late step); this form vectorizes: e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln(2)/2,
 * e^r by a degree-7 polynomial (Cephes expf coefficients), 2^n built in the exponent bits. Relative error
 * about 1e-7 for x in [-87, 0], the range used here (scores minus their maximum). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;  /* ln 2 in two parts, for accuracy */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int i; float f; } scale = { .i = ((int)n + 127) << 23 };
    return p * scale.f;
}

/* One head's attention over the cached positions: y (D) = softmax(q . k_t) . v_t, t < end. kc, vc (end, D);
 * att (end) is scratch. q already carries 1/sqrt(D). y may alias q (q is read first). */
static void attend_scalar(const float *q, const float *restrict kc, const float *restrict vc, int end, int D,
                          float *restrict att, float *y) {
    matvec(kc, q, att, end, D, 0);
    float top = att[0], total = 0.0f;
    for (int t = 1; t < end; t++) top = att[t] > top ? att[t] : top;
#pragma omp simd reduction(+ : total)
    for (int t = 0; t < end; t++) { att[t] = exp_nonpositive(att[t] - top); total += att[t]; }
    const float inv_total = 1.0f / total;
    for (int i = 0; i < D; i++) y[i] = 0.0f;
    /* y += sum_t p_t v_t, four positions per pass over y: y lives in memory (D is not known here), and
     * one load and store of it per position made this loop the slowest part of a late step. */
    int t = 0;
    for (; t + 4 <= end; t += 4) {
        const float p0 = att[t] * inv_total, p1 = att[t + 1] * inv_total;
        const float p2 = att[t + 2] * inv_total, p3 = att[t + 3] * inv_total;
        const float *restrict v0 = vc + (size_t)t * D, *restrict v1 = v0 + D;
        const float *restrict v2 = v1 + D, *restrict v3 = v2 + D;
#pragma omp simd
        for (int i = 0; i < D; i++) y[i] += (p0 * v0[i] + p1 * v1[i]) + (p2 * v2[i] + p3 * v3[i]);
    }
    for (; t < end; t++) {
        const float p = att[t] * inv_total;
        const float *restrict vt = vc + (size_t)t * D;
#pragma omp simd
        for (int i = 0; i < D; i++) y[i] += p * vt[i];
    }
}

#if HAVE_HALF && defined(__AVX2__)  /* F16C, FMA (for the intrinsics and sum8 above) and AVX2 */
/* The same for head sizes that are a multiple of 8, in AVX2 registers. The scalar form spent ~100 cycles per
 * head and cached position (a late step was mostly attention): per position it reduced a dot product of D
 * across lanes, and kept y in memory. Here eight positions' dot products are reduced together, and y's
 * columns stay in registers, 32 at a time, for the whole pass over the values. */
static inline __m256 sum_each8(const __m256 *a) {  /* out[j] = sum of a[j]'s 8 lanes */
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

static inline __m256 exp_nonpositive8(__m256 x) {  /* exp_nonpositive, 8 lanes */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f),
                                     _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* y[0 : 8 nv] = sum_t att[t] v_t[0 : 8 nv], with nv (1-4) a constant after inlining: y in registers */
static inline __attribute__((always_inline)) void weighted_values(const float *restrict att,
                                                                  const float *restrict vc, int end, int D,
                                                                  int nv, float scale, float *y) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int t = 0; t < end; t++) {
        const __m256 p = _mm256_broadcast_ss(att + t);
        const float *restrict vt = vc + (size_t)t * D;
        for (int j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * j), acc[j]);
    }
    for (int j = 0; j < nv; j++) _mm256_storeu_ps(y + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(scale)));
}

static void attend_avx2(const float *q, const float *restrict kc, const float *restrict vc, int end, int D,
                        float *restrict att, float *y) {
    int t = 0;
    for (; t + 8 <= end; t += 8) {  /* scores of positions t..t+7 */
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(kc + (size_t)(t + j) * D + d), qv, acc[j]);
        }
        _mm256_storeu_ps(att + t, sum_each8(acc));
    }
    for (; t < end; t++) {
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(kc + (size_t)t * D + d), _mm256_loadu_ps(q + d), acc);
        att[t] = sum8(acc);
    }
    float top = att[0];
    for (t = 1; t < end; t++) top = att[t] > top ? att[t] : top;
    const __m256 top8 = _mm256_set1_ps(top);
    __m256 total8 = _mm256_setzero_ps();
    for (t = 0; t + 8 <= end; t += 8) {
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(att + t), top8));
        _mm256_storeu_ps(att + t, e);
        total8 = _mm256_add_ps(total8, e);
    }
    float total = sum8(total8);
    for (; t < end; t++) { att[t] = exp_nonpositive(att[t] - top); total += att[t]; }
    const float inv_total = 1.0f / total;
    for (int c = 0; c < D; c += 32) {  /* q is fully read above, so y may overwrite it */
        switch ((D - c) / 8) {
            case 1: weighted_values(att, vc + c, end, D, 1, inv_total, y + c); break;
            case 2: weighted_values(att, vc + c, end, D, 2, inv_total, y + c); break;
            case 3: weighted_values(att, vc + c, end, D, 3, inv_total, y + c); break;
            default: weighted_values(att, vc + c, end, D, 4, inv_total, y + c); break;
        }
    }
}
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

static void attend(const float *q, const float *restrict kc, const float *restrict vc, int end, int D,
                   float *restrict att, float *y) {
#if HAVE_AVX2
    if (D % 8 == 0) { attend_avx2(q, kc, vc, end, D, att, y); return; }
#endif
    attend_scalar(q, kc, vc, end, D, att, y);
}

/* QK-norm then rotary, in place on one head vector v (D): v * cos + roll(v, D/2) * sin */
static void norm_rotate(float *restrict v, const float *restrict cos_row, const float *restrict sin_row,
                        int D, float eps, float *restrict tmp) {
    rms_norm(v, tmp, D, eps);
    int half = D / 2;
    for (int i = 0; i < D; i++) {
        float rolled = tmp[i < half ? i + half : i - half];
        v[i] = tmp[i] * cos_row[i] + rolled * sin_row[i];
    }
}

int bytelm_decode_step(int n_layer, int C, int H, int F, int V, int max_len, int pos, int byte, int half,
                       float eps, float qk_eps,
                       const float *embed, const void *w_qkv, const void *w_proj, const void *w_fc,
                       const void *w_out, const void *head, const float *rope_cos, const float *rope_sin,
                       float *k_cache, float *v_cache, float *scratch, float *logits) {
    if (pos < 0 || pos >= max_len || byte < 0 || byte >= V || C % H || (half && !HAVE_HALF)) return 1;
    const int D = C / H, end = pos + 1;
    float *x = scratch;              /* (C) the residual stream */
    float *h = x + C;                /* (C) normalised input of a matrix */
    float *qkv = h + C;              /* (3C) */
    float *hidden = qkv + 3 * C;     /* (max(F, max_len)): MLP hidden, or attention weights of one head */
    const float *cos_q = rope_cos + (size_t)pos * 2 * D, *cos_k = cos_q + D;
    const float *sin_q = rope_sin + (size_t)pos * 2 * D, *sin_k = sin_q + D;

    for (int i = 0; i < C; i++) x[i] = embed[(size_t)byte * C + i];
    for (int l = 0; l < n_layer; l++) {
        /* attention */
        rms_norm(x, h, C, eps);
        weight_matvec(w_qkv, (size_t)l * 3 * C * C, half, h, qkv, 3 * C, C, 0);
        for (int hd = 0; hd < H; hd++) {
            float *q = qkv + hd * D, *k = qkv + C + hd * D, *v = qkv + 2 * C + hd * D;
            norm_rotate(q, cos_q, sin_q, D, qk_eps, h);
            norm_rotate(k, cos_k, sin_k, D, qk_eps, h);
            float *kc = k_cache + (((size_t)l * H + hd) * max_len) * D;  /* (max_len, D) */
            float *vc = v_cache + (((size_t)l * H + hd) * max_len) * D;
            for (int i = 0; i < D; i++) { kc[(size_t)pos * D + i] = k[i]; vc[(size_t)pos * D + i] = v[i]; }
            attend(q, kc, vc, end, D, hidden, q);  /* the head's output goes in place of q */
        }
        weight_matvec(w_proj, (size_t)l * C * C, half, qkv, x, C, C, 1);  /* heads' outputs are qkv[0:C] */
        /* MLP: ReLU^2 */
        rms_norm(x, h, C, eps);
        weight_matvec(w_fc, (size_t)l * F * C, half, h, hidden, F, C, 0);
        for (int i = 0; i < F; i++) { float r = hidden[i] > 0.0f ? hidden[i] : 0.0f; hidden[i] = r * r; }
        weight_matvec(w_out, (size_t)l * C * F, half, hidden, x, C, F, 1);
    }
    rms_norm(x, h, C, eps);
    weight_matvec(head, 0, half, h, logits, V, C, 0);
    return 0;
}
