/* Attention of one query over rows of keys and values in AVX2 registers (attend_row, for the decode step in
 * bytelm/csrc/decode_step.c), and the dot products, maxima, exponentials and weighted sums of rows it is made of.
 *
 * Rows are D floats (D a multiple of 8) `rs` floats apart. Per row, a plain loop reduces a dot product of D
 * across vector lanes on its own and keeps its output in memory, about 100 cycles per head and position for
 * D = 24; here eight rows' dot products are reduced together and the output's columns stay in registers, 32 at
 * a time, for one pass over the rows. */
#ifndef BYTELM_ATTEND_H
#define BYTELM_ATTEND_H
#include <math.h>
#include <stddef.h>

/* e^x for x <= 0 (scores minus their maximum): e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln(2)/2, e^r by
 * a degree-7 polynomial (Cephes expf coefficients), 2^n built in the exponent bits. Relative error about 1e-7
 * for x in [-87, 0]; below -87 it returns e^-87 (about 1.6e-38), not 0. libm's expf is a scalar call, which
 * made it most of a late decode step. */
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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BYTELM_AVX2 1

static inline float sum8(__m256 v) {  /* the sum of v's 8 lanes */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

static inline __m256 sum_each8(const __m256 *a) {  /* out[j] = the sum of a[j]'s 8 lanes, j < 8 */
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

/* out[j] = scale * x . rows[j] for j < n; x (D), rows (n, D) `rs` floats apart */
static inline void dots(const float *x, const float *rows, size_t rs, int n, int D, float scale, float *out) {
    const __m256 s8 = _mm256_set1_ps(scale);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            const __m256 xv = _mm256_loadu_ps(x + d);
            for (int r = 0; r < 8; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + (size_t)(j + r) * rs + d), xv, acc[r]);
        }
        _mm256_storeu_ps(out + j, _mm256_mul_ps(sum_each8(acc), s8));
    }
    for (; j < n; j++) {
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(rows + (size_t)j * rs + d), _mm256_loadu_ps(x + d), acc);
        out[j] = sum8(acc) * scale;
    }
}

/* s[j] = e^(s[j] - shift) for j < n, where shift >= every s[j]; returns their sum */
static inline float exp_shifted(float *s, int n, float shift) {
    const __m256 shift8 = _mm256_set1_ps(shift);
    __m256 total8 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift8));
        _mm256_storeu_ps(s + j, e);
        total8 = _mm256_add_ps(total8, e);
    }
    float total = sum8(total8);
    for (; j < n; j++) { s[j] = exp_nonpositive(s[j] - shift); total += s[j]; }
    return total;
}

/* max_j s[j], j < n (n >= 1), eight at a time: a scalar compare-and-select chain took ~4 cycles per element */
static inline float max_of(const float *s, int n) {
    __m256 top = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= n; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
    float best = -INFINITY;
    float lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int u = 0; u < 8; u++) best = lanes[u] > best ? lanes[u] : best;
    for (; j < n; j++) best = s[j] > best ? s[j] : best;
    return best;
}

/* y[0 : 8 nv] = scale * sum_j w[j] rows[j][0 : 8 nv], nv (1-4) a constant after inlining: y in registers.
 * Two rows per iteration into two sets of sums: one set would wait on the previous row's FMA every row. */
static inline __attribute__((always_inline)) void weighted_chunk(const float *restrict w, const float *rows,
                                                                 size_t rs, int n, int nv, float scale,
                                                                 float *y) {
    __m256 a[4], b[4];
    for (int c = 0; c < 4; c++) a[c] = b[c] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 2 <= n; j += 2) {
        const __m256 p0 = _mm256_broadcast_ss(w + j), p1 = _mm256_broadcast_ss(w + j + 1);
        const float *r0 = rows + (size_t)j * rs, *r1 = r0 + rs;
        for (int c = 0; c < nv; c++) {
            a[c] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(r0 + 8 * c), a[c]);
            b[c] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(r1 + 8 * c), b[c]);
        }
    }
    if (j < n) {
        const __m256 p0 = _mm256_broadcast_ss(w + j);
        for (int c = 0; c < nv; c++) a[c] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(rows + (size_t)j * rs + 8 * c), a[c]);
    }
    for (int c = 0; c < nv; c++)
        _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(_mm256_add_ps(a[c], b[c]), _mm256_set1_ps(scale)));
}

/* y (D) = scale * sum_j w[j] rows[j] for j < n. y may alias anything the caller no longer needs except w. */
static inline void weighted_rows(const float *restrict w, const float *rows, size_t rs, int n, int D, float scale,
                                 float *y) {
    for (int c = 0; c < D; c += 32) {
        switch ((D - c) / 8) {
            case 1: weighted_chunk(w, rows + c, rs, n, 1, scale, y + c); break;
            case 2: weighted_chunk(w, rows + c, rs, n, 2, scale, y + c); break;
            case 3: weighted_chunk(w, rows + c, rs, n, 3, scale, y + c); break;
            default: weighted_chunk(w, rows + c, rs, n, 4, scale, y + c); break;
        }
    }
}

/* y (D) = softmax(scale * q . k_j) . v_j over j < n; att (n) is scratch. y may alias q. */
static inline void attend_row(const float *q, const float *k, size_t ks, const float *v, size_t vs, int n, int D,
                              float scale, float *restrict att, float *y) {
    dots(q, k, ks, n, D, scale, att);
    const float top = max_of(att, n);
    const float total = exp_shifted(att, n, top);
    weighted_rows(att, v, vs, n, D, 1.0f / total, y);
}
#else
#define BYTELM_AVX2 0
#endif
#endif
