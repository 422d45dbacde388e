/* The weight products of the decode step (bytelm/csrc/decode_step.c): y_b = W @ x_b for every row b of a batch,
 * reading W once for all rows, with each row's sums in the same order as when it is stepped alone.
 *
 * Why once: at batch 1 a step is bounded by reading the weights (5.4 MB in fp16 for the default model). With
 * B rows, each block of eight weight rows is read from memory once and then used from the L1 cache by every
 * row of the batch, three rows at a time (24 sums of eight lanes in registers).
 *
 * Why the same order: a generation's bytes must not depend on who else is being served. Each (weight row,
 * batch row) pair has its own chain of fused multiply-adds over the columns, eight at a time in ascending
 * order, reduced by the same tree (sum_each8), so a row's result is bitwise the same whatever the batch size,
 * the row's place in it, or how the rows are grouped (tests/test_decode.py checks it).
 */
#ifndef BYTELM_MATVEC_H
#define BYTELM_MATVEC_H
#include <stddef.h>

#include "attend.h"

/* The batch's vectors of one kind: row b's is base + b * stride, or each[b] when `each` is set. */
typedef struct {
    float *base;
    size_t stride;
    float *const *each;  /* or NULL */
} Vectors;

static inline float *vector_at(Vectors v, int b) { return v.each ? v.each[b] : v.base + (size_t)b * v.stride; }

/* y (rows) = W (rows, cols) @ x (cols) [+ y if accumulate]. Four rows at a time: four independent sums
 * keep the vector units busy while the next rows stream in from memory. The portable version. */
static void matvec(const float *restrict w, const float *restrict x, float *restrict y, int rows, int cols,
                   int accumulate) {
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

#if BYTELM_AVX2 && defined(__F16C__)
#define HAVE_HALF 1
#else
#define HAVE_HALF 0
#endif

#if BYTELM_AVX2
/* Weights from element i of w as float: w holds float, or IEEE half when `half` is set (F16C converts 8 at a
 * time; half the bytes to read). Always inlined with a constant `half`, so the test disappears. */
static inline __attribute__((always_inline)) __m256 load8(const void *w, size_t i, int half) {
#if HAVE_HALF
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const unsigned short *)w + i)));
#endif
    return _mm256_loadu_ps((const float *)w + i);
}
static inline __attribute__((always_inline)) float load1(const void *w, size_t i, int half) {
#if HAVE_HALF
    if (half) return _cvtsh_ss(((const unsigned short *)w)[i]);
#endif
    return ((const float *)w)[i];
}

/* Weight rows r..r+7 against nb (1-3, a constant after inlining) rows of the batch: y[b][r + j] = W[r + j] .
 * x[b] [+ y[b][r + j]]. Eight independent chains of FMAs per batch row: with four, each FMA waited on the
 * previous one in its chain, and latency, not memory, bounded the loop; eight made the default model's
 * products about 1.6x faster. The eight weight vectors of a column block are loaded once for the nb rows. */
static inline __attribute__((always_inline)) void block8(const void *restrict w, size_t row0, int cols,
                                                         const float *const *x, float *const *y, int nb, int r,
                                                         int accumulate, int half) {
    __m256 acc[3][8];
    for (int b = 0; b < nb; b++)
        for (int j = 0; j < 8; j++) acc[b][j] = _mm256_setzero_ps();
    for (int c = 0; c + 8 <= cols; c += 8) {
        __m256 xv[3];
        for (int b = 0; b < nb; b++) xv[b] = _mm256_loadu_ps(x[b] + c);
        for (int j = 0; j < 8; j++) {
            const __m256 wv = load8(w, row0 + (size_t)j * cols + c, half);
            for (int b = 0; b < nb; b++) acc[b][j] = _mm256_fmadd_ps(wv, xv[b], acc[b][j]);
        }
    }
    for (int b = 0; b < nb; b++) {
        float out[8];
        _mm256_storeu_ps(out, sum_each8(acc[b]));
        for (int j = 0; j < 8; j++) {
            for (int c = cols & ~7; c < cols; c++) out[j] += load1(w, row0 + (size_t)j * cols + c, half) * x[b][c];
            y[b][r + j] = accumulate ? y[b][r + j] + out[j] : out[j];
        }
    }
}

/* Weight rows r..r+7 (from w at row0, `half` a constant) against every row of the batch, three at a time, or
 * two and two where three and one would be left: a group of one converts and loads a weight per FMA. */
static inline __attribute__((always_inline)) void block8_rows(const void *restrict w, size_t row0, int cols,
                                                              Vectors xs, Vectors ys, int n, int r, int accumulate,
                                                              int half) {
    for (int b = 0, nb; b < n; b += nb) {
        const float *x[3];
        float *y[3];
        nb = n - b == 4 ? 2 : n - b < 3 ? n - b : 3;
        for (int i = 0; i < nb; i++) { x[i] = vector_at(xs, b + i); y[i] = vector_at(ys, b + i); }
        if (nb == 3) block8(w, row0, cols, x, y, 3, r, accumulate, half);
        else if (nb == 2) block8(w, row0, cols, x, y, 2, r, accumulate, half);
        else block8(w, row0, cols, x, y, 1, r, accumulate, half);
    }
}

/* y_b (rows) = W (rows, cols) @ x_b (cols) [+ y_b] for b < n: each block of eight weight rows once for the
 * whole batch; the last rows % 8 weight rows one by one. Half weights are converted again for each group of
 * three rows: converting a block once into a float buffer for all groups measured slower (the stores). */
static inline __attribute__((always_inline)) void matvec8_rows(const void *restrict w, Vectors xs, Vectors ys,
                                                               int n, int rows, int cols, int accumulate,
                                                               int half) {
    int r = 0;
    for (; r + 8 <= rows; r += 8) block8_rows(w, (size_t)r * cols, cols, xs, ys, n, r, accumulate, half);
    for (; r < rows; r++) {
        for (int b = 0; b < n; b++) {
            const float *x = vector_at(xs, b);
            float acc = 0.0f;
            for (int c = 0; c < cols; c++) acc += load1(w, (size_t)r * cols + c, half) * x[c];
            float *y = vector_at(ys, b);
            y[r] = accumulate ? y[r] + acc : acc;
        }
    }
}
#endif

/* The weight matrices are float, or half (unsigned short bits) when `half` is set; `offset` in elements. */
static void weight_matvec_rows(const void *w, size_t offset, int half, Vectors xs, Vectors ys, int n, int rows,
                               int cols, int accumulate) {
#if BYTELM_AVX2
    if (half) matvec8_rows((const unsigned short *)w + offset, xs, ys, n, rows, cols, accumulate, 1);
    else matvec8_rows((const float *)w + offset, xs, ys, n, rows, cols, accumulate, 0);
#else
    (void)half;
    for (int b = 0; b < n; b++)
        matvec((const float *)w + offset, vector_at(xs, b), vector_at(ys, b), rows, cols, accumulate);
#endif
}
#endif
