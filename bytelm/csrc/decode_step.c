/* One-byte decode step of ByteLM in plain C (fp32, batch 1, one thread).
 *
 * The same arithmetic as bytelm/decode.py's torch path (and so as ByteLM.forward with a KV cache), in one
 * call: at batch 1 a step is ~25 small matrix-vector products plus ~150 elementwise operations, and in torch
 * each of those costs microseconds of dispatch. Here the step is bounded by reading the weights once.
 *
 * Built and loaded by bytelm/native.py (-O3 -march=native); tests/test_decode.py checks it against the
 * reference. The caller fills a DecodeStep (bytelm.native.DecodeStep, the same fields in the same order) once
 * and passes it with each position and byte. Layouts (all row-major, contiguous, float32):
 *   embed (V, C); w_qkv (L, 3C, C); w_proj (L, C, C); w_fc (L, F, C); w_out (L, C, F); head (V, C)
 *   (the last five float, or IEEE half when `half` is set: see bytelm_half_supported)
 *   rope_cos, rope_sin (rope_len, 2, D): per position, a row for queries (scaled by 1/sqrt(D)) and one for keys
 *   value_embed (V, L, C) or NULL: each layer's row for the byte, added to its values (ModelConfig.value_embeds)
 *   k_cache, v_cache (L, H, max_len, D): the KVCache tensors of batch 1
 *   scratch: at least 5C + max(F, max_len) floats; logits (V)
 * Every buffer comes with its size in elements, and bytelm_decode_step checks the dimensions, the sizes, the
 * position and the byte before it touches any memory: a wrong call is refused with a message in `error`.
 * RMSNorm weights are already folded into w_qkv, w_fc and head (see decode.py).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "attend.h"

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

/* y (rows) = W (rows, cols) @ x (cols) [+ y if accumulate], eight rows at a time: eight independent chains of
 * FMAs. With four, each FMA waited on the previous one in its chain, and latency, not memory, bounded the
 * loop; eight made the default model's products about 1.6x faster (docs/generation.md). */
static inline __attribute__((always_inline)) void matvec8(const void *restrict w, const float *restrict x,
                                                          float *restrict y, int rows, int cols, int accumulate,
                                                          int half) {
    int r = 0;
    for (; r + 8 <= rows; r += 8) {
        const size_t row0 = (size_t)r * cols;
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int c = 0; c + 8 <= cols; c += 8) {
            const __m256 xv = _mm256_loadu_ps(x + c);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(load8(w, row0 + (size_t)j * cols + c, half), xv, acc[j]);
        }
        float out[8];
        _mm256_storeu_ps(out, sum_each8(acc));
        for (int j = 0; j < 8; j++) {
            for (int c = cols & ~7; c < cols; c++) out[j] += load1(w, row0 + (size_t)j * cols + c, half) * x[c];
            y[r + j] = accumulate ? y[r + j] + out[j] : out[j];
        }
    }
    for (; r < rows; r++) {
        float acc = 0.0f;
        for (int c = 0; c < cols; c++) acc += load1(w, (size_t)r * cols + c, half) * x[c];
        y[r] = accumulate ? y[r] + acc : acc;
    }
}
#endif

/* Whether this build can take half-precision weights (x86 with F16C and FMA: bytelm_decode_step's `half`). */
int bytelm_half_supported(void) { return HAVE_HALF; }

/* The weight matrices are float, or half (unsigned short bits) when `half` is set; `offset` in elements. */
static void weight_matvec(const void *w, size_t offset, int half, const float *restrict x, float *restrict y,
                          int rows, int cols, int accumulate) {
#if BYTELM_AVX2
    if (half) matvec8((const unsigned short *)w + offset, x, y, rows, cols, accumulate, 1);
    else matvec8((const float *)w + offset, x, y, rows, cols, accumulate, 0);
#else
    matvec((const float *)w + offset, x, y, rows, cols, accumulate);
#endif
}

/* out = x / sqrt(mean(x^2) + eps), no weight (folded into the next matrix) */
static void rms_norm(const float *restrict x, float *restrict out, int n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r;
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

static void attend(const float *q, const float *restrict kc, const float *restrict vc, int end, int D,
                   float *restrict att, float *y) {
#if BYTELM_AVX2
    if (D % 8 == 0) { attend_row(q, kc, D, vc, D, end, D, 1.0f, att, y); return; }  /* see attend.h */
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

/* y += x (n). Kept out of line: inlined into the step, the step of a model WITHOUT value embeddings measured
 * 10-15% slower in alternating runs (default model, fp16 weights); out of line, no slower within the noise. */
__attribute__((noinline)) static void add_row(float *restrict y, const float *restrict x, int n) {
    for (int i = 0; i < n; i++) y[i] += x[i];
}

/* The model and buffers of a decode step: bytelm.native.DecodeStep declares the same fields in the same order
 * (bytelm_decode_step_size lets it check). Each buffer's size is its length in elements, as allocated. */
typedef struct {
    int32_t n_layer, C, H, F, V, max_len, rope_len, half;
    float eps, qk_eps;
    const float *embed; int64_t embed_size;
    const void *w_qkv; int64_t w_qkv_size;
    const void *w_proj; int64_t w_proj_size;
    const void *w_fc; int64_t w_fc_size;
    const void *w_out; int64_t w_out_size;
    const void *head; int64_t head_size;
    const float *rope_cos; int64_t rope_cos_size;
    const float *rope_sin; int64_t rope_sin_size;
    const float *value_embed; int64_t value_embed_size;  /* NULL and 0 without value embeddings */
    float *k_cache; int64_t k_cache_size;
    float *v_cache; int64_t v_cache_size;
    float *scratch; int64_t scratch_size;
    float *logits; int64_t logits_size;
    char error[200];  /* why the last call was refused */
} DecodeStep;

size_t bytelm_decode_step_size(void) { return sizeof(DecodeStep); }

/* a * b * c * d, or -1 if it overflows int64 (every factor >= 0) */
static int64_t product(int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t ab, abc, abcd;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc) ||
        __builtin_mul_overflow(abc, d, &abcd)) return -1;
    return abcd;
}

/* 0 if buffer `name` is there and holds `want` elements (at least `want` when `at_least`), else 1 with the
 * reason in s->error */
static int check_buffer(DecodeStep *s, const char *name, const void *data, int64_t size, int64_t want, int at_least) {
    if (want < 0) { snprintf(s->error, sizeof s->error, "the size of %s overflows", name); return 1; }
    if (!data) { snprintf(s->error, sizeof s->error, "%s is NULL", name); return 1; }
    if (at_least ? size < want : size != want) {
        snprintf(s->error, sizeof s->error, "%s holds %lld elements where the dimensions need %s%lld", name,
                 (long long)size, at_least ? "at least " : "", (long long)want);
        return 1;
    }
    return 0;
}

/* 0 if the dimensions are positive and consistent and every buffer has the size they imply, else 1 */
static int check_step(DecodeStep *s) {
    if (s->n_layer < 1 || s->C < 1 || s->H < 1 || s->F < 1 || s->V < 1 || s->max_len < 1 || s->rope_len < 1) {
        snprintf(s->error, sizeof s->error, "dimensions must be positive (n_layer %d, C %d, H %d, F %d, V %d, "
                 "max_len %d, rope_len %d)", s->n_layer, s->C, s->H, s->F, s->V, s->max_len, s->rope_len);
        return 1;
    }
    if (s->C % s->H || (s->C / s->H) % 2) {
        snprintf(s->error, sizeof s->error, "C (%d) must split into H (%d) heads of even size", s->C, s->H);
        return 1;
    }
    if (s->half != 0 && (s->half != 1 || !HAVE_HALF)) {
        snprintf(s->error, sizeof s->error, "half-precision weights are not supported by this build");
        return 1;
    }
    const int64_t L = s->n_layer, C = s->C, F = s->F, V = s->V, D = C / s->H;
    const int64_t scratch = 5 * C + (F > s->max_len ? F : s->max_len);
    return check_buffer(s, "embed", s->embed, s->embed_size, product(V, C, 1, 1), 0)
        || check_buffer(s, "w_qkv", s->w_qkv, s->w_qkv_size, product(L, 3, C, C), 0)
        || check_buffer(s, "w_proj", s->w_proj, s->w_proj_size, product(L, C, C, 1), 0)
        || check_buffer(s, "w_fc", s->w_fc, s->w_fc_size, product(L, F, C, 1), 0)
        || check_buffer(s, "w_out", s->w_out, s->w_out_size, product(L, C, F, 1), 0)
        || check_buffer(s, "head", s->head, s->head_size, product(V, C, 1, 1), 0)
        || check_buffer(s, "rope_cos", s->rope_cos, s->rope_cos_size, product(s->rope_len, 2, D, 1), 0)
        || check_buffer(s, "rope_sin", s->rope_sin, s->rope_sin_size, product(s->rope_len, 2, D, 1), 0)
        || (s->value_embed || s->value_embed_size
            ? check_buffer(s, "value_embed", s->value_embed, s->value_embed_size, product(V, L, C, 1), 0) : 0)
        || check_buffer(s, "k_cache", s->k_cache, s->k_cache_size, product(L, C, s->max_len, 1), 0)
        || check_buffer(s, "v_cache", s->v_cache, s->v_cache_size, product(L, C, s->max_len, 1), 0)
        || check_buffer(s, "scratch", s->scratch, s->scratch_size, scratch, 1)
        || check_buffer(s, "logits", s->logits, s->logits_size, V, 1);
}

/* Feeds `byte` at position `pos`: writes its keys and values into the caches at `pos` and the next byte's logits
 * into s->logits. Returns 0, or 1 (nothing touched) with the reason in s->error. */
int bytelm_decode_step(DecodeStep *s, int pos, int byte) {
    if (!s) return 1;
    s->error[0] = '\0';
    if (check_step(s)) return 1;
    if (pos < 0 || pos >= s->max_len || pos >= s->rope_len) {
        snprintf(s->error, sizeof s->error, "position %d is outside the cache (%d positions) or the rotary tables "
                 "(%d)", pos, s->max_len, s->rope_len);
        return 1;
    }
    if (byte < 0 || byte >= s->V) {
        snprintf(s->error, sizeof s->error, "byte %d is outside 0..%d", byte, s->V - 1);
        return 1;
    }
    const int n_layer = s->n_layer, C = s->C, H = s->H, F = s->F, V = s->V, max_len = s->max_len, half = s->half;
    const float eps = s->eps, qk_eps = s->qk_eps;
    const float *embed = s->embed, *value_embed = s->value_embed;
    const void *w_qkv = s->w_qkv, *w_proj = s->w_proj, *w_fc = s->w_fc, *w_out = s->w_out, *head = s->head;
    float *k_cache = s->k_cache, *v_cache = s->v_cache, *logits = s->logits;
    const int D = C / H, end = pos + 1;
    float *x = s->scratch;           /* (C) the residual stream */
    float *h = x + C;                /* (C) normalised input of a matrix */
    float *qkv = h + C;              /* (3C) */
    float *hidden = qkv + 3 * C;     /* (max(F, max_len)): MLP hidden, or attention weights of one head */
    const float *cos_q = s->rope_cos + (size_t)pos * 2 * D, *cos_k = cos_q + D;
    const float *sin_q = s->rope_sin + (size_t)pos * 2 * D, *sin_k = sin_q + D;

    for (int i = 0; i < C; i++) x[i] = embed[(size_t)byte * C + i];
    for (int l = 0; l < n_layer; l++) {
        /* attention */
        rms_norm(x, h, C, eps);
        weight_matvec(w_qkv, (size_t)l * 3 * C * C, half, h, qkv, 3 * C, C, 0);
        if (value_embed)  /* this layer's row of the byte's value table joins the values */
            add_row(qkv + 2 * C, value_embed + ((size_t)byte * n_layer + l) * C, C);
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
