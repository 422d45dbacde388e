/* The one-byte decode step of ByteLM in plain C (fp32 arithmetic, one thread): for one row, or for a batch of
 * rows that each feed one byte at their own position into their own KV cache.
 *
 * The same arithmetic as bytelm/decode.py's torch path (and so as ByteLM.forward with a KV cache), in one
 * call: at batch 1 a step is ~25 small matrix-vector products plus ~150 elementwise operations, and in torch
 * each of those costs microseconds of dispatch. A batched step (bytelm_decode_rows) reads each weight once for
 * all its rows (bytelm/csrc/matvec.h), and gives every row bitwise the logits the single step gives it alone.
 *
 * Built and loaded by bytelm/native.py (-O3 -march=native); tests/test_decode.py checks it against the
 * reference. The caller fills a DecodeStep (bytelm.native.DecodeStep, the same fields in the same order) once
 * and passes it with each position and byte, or with an array of DecodeRow. Layouts (row-major, contiguous):
 *   embed (V, C); w_qkv (L, 3C, C); w_proj (L, C, C); w_fc (L, F, C); w_out (L, C, F); head (V, C)
 *   (the last five float, or IEEE half when `half` is set: see bytelm_half_supported)
 *   rope_cos, rope_sin (rope_len, 2, D): per position, a row for queries (scaled by 1/sqrt(D)) and one for keys
 *   value_embed (V, L, C) or NULL: each layer's row for the byte, added to its values (ModelConfig.value_embeds)
 *   k_cache, v_cache (L, H, max_len, D): the KVCache tensors of batch 1, one pair per row
 *   scratch: at least 5C + max(F, max_len) floats per row (see bytelm_decode_rows); logits (V) per row
 * Every buffer comes with its size in elements, and both entry points check the dimensions, the sizes, the
 * positions and the bytes, and that no two buffers they write overlap, before they touch any memory: a wrong
 * call is refused with a message in `error`. RMSNorm weights are already folded into w_qkv, w_fc and head.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "attend.h"
#include "matvec.h"

/* Whether this build can take half-precision weights (x86 with F16C and FMA: DecodeStep's `half`). */
int bytelm_half_supported(void) { return HAVE_HALF; }

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
 * (bytelm_decode_step_size lets it check). Each buffer's size is its length in elements, as allocated.
 * max_len, k_cache, v_cache and logits are the row of bytelm_decode_step; bytelm_decode_rows takes its rows
 * from a DecodeRow array instead and ignores them. */
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

/* One row of a batched step (bytelm.native.DecodeRow): its byte and position, and its own KV cache
 * (L, H, max_len, D) and logits (V). Rows of one call may sit at different positions. */
typedef struct {
    int32_t byte, pos, max_len;
    float *k_cache; int64_t k_cache_size;
    float *v_cache; int64_t v_cache_size;
    float *logits; int64_t logits_size;
} DecodeRow;

/* The most rows one call takes: the checks compare every pair of rows' buffers. */
#define MAX_ROWS 256

size_t bytelm_decode_step_size(void) { return sizeof(DecodeStep); }
size_t bytelm_decode_row_size(void) { return sizeof(DecodeRow); }
int bytelm_decode_max_rows(void) { return MAX_ROWS; }

/* a * b * c * d, or -1 if it overflows int64 (every factor >= 0) */
static int64_t product(int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t ab, abc, abcd;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc) ||
        __builtin_mul_overflow(abc, d, &abcd)) return -1;
    return abcd;
}

/* 0 if buffer `name` (after `prefix`) is there and holds `want` elements (at least `want` when `at_least`),
 * else 1 with the reason in s->error */
static int check_buffer(DecodeStep *s, const char *prefix, const char *name, const void *data, int64_t size,
                        int64_t want, int at_least) {
    if (want < 0) { snprintf(s->error, sizeof s->error, "%sthe size of %s overflows", prefix, name); return 1; }
    if (!data) { snprintf(s->error, sizeof s->error, "%s%s is NULL", prefix, name); return 1; }
    if (at_least ? size < want : size != want) {
        snprintf(s->error, sizeof s->error, "%s%s holds %lld elements where the dimensions need %s%lld", prefix,
                 name, (long long)size, at_least ? "at least " : "", (long long)want);
        return 1;
    }
    return 0;
}

/* 0 if the dimensions are positive and consistent and the model's buffers have the sizes they imply, else 1 */
static int check_model(DecodeStep *s) {
    if (s->n_layer < 1 || s->C < 1 || s->H < 1 || s->F < 1 || s->V < 1 || s->rope_len < 1) {
        snprintf(s->error, sizeof s->error, "dimensions must be positive (n_layer %d, C %d, H %d, F %d, V %d, "
                 "rope_len %d)", s->n_layer, s->C, s->H, s->F, s->V, s->rope_len);
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
    return check_buffer(s, "", "embed", s->embed, s->embed_size, product(V, C, 1, 1), 0)
        || check_buffer(s, "", "w_qkv", s->w_qkv, s->w_qkv_size, product(L, 3, C, C), 0)
        || check_buffer(s, "", "w_proj", s->w_proj, s->w_proj_size, product(L, C, C, 1), 0)
        || check_buffer(s, "", "w_fc", s->w_fc, s->w_fc_size, product(L, F, C, 1), 0)
        || check_buffer(s, "", "w_out", s->w_out, s->w_out_size, product(L, C, F, 1), 0)
        || check_buffer(s, "", "head", s->head, s->head_size, product(V, C, 1, 1), 0)
        || check_buffer(s, "", "rope_cos", s->rope_cos, s->rope_cos_size, product(s->rope_len, 2, D, 1), 0)
        || check_buffer(s, "", "rope_sin", s->rope_sin, s->rope_sin_size, product(s->rope_len, 2, D, 1), 0)
        || (s->value_embed || s->value_embed_size
            ? check_buffer(s, "", "value_embed", s->value_embed, s->value_embed_size, product(V, L, C, 1), 0) : 0);
}

/* 0 if a row's cache sizes match the model and its max_len, its position fits the cache and the rotary
 * tables and its byte the vocabulary, else 1 */
static int check_row(DecodeStep *s, const DecodeRow *row, const char *prefix) {
    if (row->max_len < 1) {
        snprintf(s->error, sizeof s->error, "%smax_len must be positive, not %d", prefix, row->max_len);
        return 1;
    }
    const int64_t cache = product(s->n_layer, s->C, row->max_len, 1);
    if (check_buffer(s, prefix, "k_cache", row->k_cache, row->k_cache_size, cache, 0)
        || check_buffer(s, prefix, "v_cache", row->v_cache, row->v_cache_size, cache, 0)
        || check_buffer(s, prefix, "logits", row->logits, row->logits_size, s->V, 1)) return 1;
    if (row->pos < 0 || row->pos >= row->max_len || row->pos >= s->rope_len) {
        snprintf(s->error, sizeof s->error, "%sposition %d is outside the cache (%d positions) or the rotary "
                 "tables (%d)", prefix, row->pos, row->max_len, s->rope_len);
        return 1;
    }
    if (row->byte < 0 || row->byte >= s->V) {
        snprintf(s->error, sizeof s->error, "%sbyte %d is outside 0..%d", prefix, row->byte, s->V - 1);
        return 1;
    }
    return 0;
}

/* A buffer the step writes: its name, its row (-1 for the scratch) and the bytes [lo, hi) it spans. */
typedef struct { const char *name; int row; uintptr_t lo, hi; } Span;

/* Buffer i of those a call writes: 0 the scratch (its first `scratch_used` floats), then each row's k_cache,
 * v_cache and logits */
static Span written(const DecodeStep *s, const DecodeRow *rows, int i, int64_t scratch_used) {
    static const char *names[3] = {"k_cache", "v_cache", "logits"};
    if (i == 0) return (Span){"scratch", -1, (uintptr_t)s->scratch, (uintptr_t)(s->scratch + scratch_used)};
    const DecodeRow *r = &rows[(i - 1) / 3];
    const float *data = i % 3 == 1 ? r->k_cache : i % 3 == 2 ? r->v_cache : r->logits;
    const int64_t size = i % 3 == 1 ? r->k_cache_size : i % 3 == 2 ? r->v_cache_size : s->V;
    return (Span){names[(i - 1) % 3], (i - 1) / 3, (uintptr_t)data, (uintptr_t)(data + size)};
}

static int by_start(const void *a, const void *b) {
    const Span *x = a, *y = b;
    return x->lo != y->lo ? (x->lo < y->lo ? -1 : 1) : x->row - y->row;  /* a total order: a stable message */
}

/* 0 if no two buffers the step writes overlap, else 1: two rows given the same cache would each overwrite the
 * other's keys. Sorted by start, a buffer that overlaps any other overlaps the next one (none is empty). */
static int check_disjoint(DecodeStep *s, const DecodeRow *rows, int n, int64_t scratch_used) {
    Span spans[3 * MAX_ROWS + 1];
    for (int i = 0; i <= 3 * n; i++) spans[i] = written(s, rows, i, scratch_used);
    qsort(spans, 3 * n + 1, sizeof spans[0], by_start);
    for (int i = 0; i < 3 * n; i++) {
        const Span p = spans[i], q = spans[i + 1];
        if (q.lo < p.hi) {
            if (p.row < 0 || q.row < 0)
                snprintf(s->error, sizeof s->error, "the scratch overlaps row %d's %s", p.row < 0 ? q.row : p.row,
                         p.row < 0 ? q.name : p.name);
            else snprintf(s->error, sizeof s->error, "row %d's %s overlaps row %d's %s", p.row, p.name, q.row,
                          q.name);
            return 1;
        }
    }
    return 0;
}

/* The floats of scratch each row uses: x, h (C each), qkv (3C), and max(F, max_len) for the MLP's hidden
 * layer or one head's attention weights. Rows are 16 floats (64 bytes) apart at least, so each row's buffers
 * sit at the same alignment as a lone row's: any vectorised loop then splits them the same way. */
static int64_t row_scratch(const DecodeStep *s, int max_len) {
    return 5 * (int64_t)s->C + (s->F > max_len ? s->F : max_len);
}

/* Every layer for every row; the checks have passed. Row b's buffers are scratch + b * stride. */
static void step_rows(DecodeStep *s, const DecodeRow *rows, int n, size_t stride) {
    const int n_layer = s->n_layer, C = s->C, H = s->H, F = s->F, V = s->V, half = s->half;
    const float eps = s->eps, qk_eps = s->qk_eps;
    const float *embed = s->embed, *value_embed = s->value_embed;
    const void *w_qkv = s->w_qkv, *w_proj = s->w_proj, *w_fc = s->w_fc, *w_out = s->w_out, *head = s->head;
    const int D = C / H;
    /* per row: x (C) the residual stream; h (C) the normalised input of a matrix; qkv (3C); hidden */
    const Vectors x = {s->scratch, stride, NULL}, h = {s->scratch + C, stride, NULL};
    const Vectors qkv = {s->scratch + 2 * C, stride, NULL}, hidden = {s->scratch + 5 * C, stride, NULL};
    float *logit_rows[n];
    for (int b = 0; b < n; b++) logit_rows[b] = rows[b].logits;
    const Vectors logits = {NULL, 0, logit_rows};

    for (int b = 0; b < n; b++)
        for (int i = 0; i < C; i++) vector_at(x, b)[i] = embed[(size_t)rows[b].byte * C + i];
    for (int l = 0; l < n_layer; l++) {
        /* attention */
        for (int b = 0; b < n; b++) rms_norm(vector_at(x, b), vector_at(h, b), C, eps);
        weight_matvec_rows(w_qkv, (size_t)l * 3 * C * C, half, h, qkv, n, 3 * C, C, 0);
        for (int b = 0; b < n; b++) {
            const int pos = rows[b].pos, max_len = rows[b].max_len;
            float *row_qkv = vector_at(qkv, b), *tmp = vector_at(h, b), *att = vector_at(hidden, b);
            const float *cos_q = s->rope_cos + (size_t)pos * 2 * D, *cos_k = cos_q + D;
            const float *sin_q = s->rope_sin + (size_t)pos * 2 * D, *sin_k = sin_q + D;
            if (value_embed)  /* this layer's row of the byte's value table joins the values */
                add_row(row_qkv + 2 * C, value_embed + ((size_t)rows[b].byte * n_layer + l) * C, C);
            for (int hd = 0; hd < H; hd++) {
                float *q = row_qkv + hd * D, *k = row_qkv + C + hd * D, *v = row_qkv + 2 * C + hd * D;
                norm_rotate(q, cos_q, sin_q, D, qk_eps, tmp);
                norm_rotate(k, cos_k, sin_k, D, qk_eps, tmp);
                float *kc = rows[b].k_cache + (((size_t)l * H + hd) * max_len) * D;  /* (max_len, D) */
                float *vc = rows[b].v_cache + (((size_t)l * H + hd) * max_len) * D;
                for (int i = 0; i < D; i++) { kc[(size_t)pos * D + i] = k[i]; vc[(size_t)pos * D + i] = v[i]; }
                attend(q, kc, vc, pos + 1, D, att, q);  /* the head's output goes in place of q */
            }
        }
        weight_matvec_rows(w_proj, (size_t)l * C * C, half, qkv, x, n, C, C, 1);  /* heads' outputs: qkv[0:C] */
        /* MLP: ReLU^2 */
        for (int b = 0; b < n; b++) rms_norm(vector_at(x, b), vector_at(h, b), C, eps);
        weight_matvec_rows(w_fc, (size_t)l * F * C, half, h, hidden, n, F, C, 0);
        for (int b = 0; b < n; b++) {
            float *hid = vector_at(hidden, b);
            for (int i = 0; i < F; i++) { float r = hid[i] > 0.0f ? hid[i] : 0.0f; hid[i] = r * r; }
        }
        weight_matvec_rows(w_out, (size_t)l * C * F, half, hidden, x, n, C, F, 1);
    }
    for (int b = 0; b < n; b++) rms_norm(vector_at(x, b), vector_at(h, b), C, eps);
    weight_matvec_rows(head, 0, half, h, logits, n, V, C, 0);
}

/* Feeds rows[b].byte at rows[b].pos for each of the n rows: writes its keys and values into that row's caches
 * and the next byte's logits into its logits, each row's bitwise the same as bytelm_decode_step gives it
 * alone. The scratch holds (n - 1) * stride + row_scratch floats, stride being row_scratch rounded up to 16
 * (max_len the largest of the rows'). Returns 0, or 1 (nothing touched) with the reason in s->error. */
int bytelm_decode_rows(DecodeStep *s, const DecodeRow *rows, int n) {
    if (!s) return 1;
    s->error[0] = '\0';
    if (check_model(s)) return 1;
    if (!rows || n < 1 || n > MAX_ROWS) {
        snprintf(s->error, sizeof s->error, "the rows must be 1 to %d, not %d%s", MAX_ROWS, n,
                 rows ? "" : " (NULL)");
        return 1;
    }
    int max_len = 1;
    for (int b = 0; b < n; b++) {
        char prefix[24] = "";  /* a lone row (bytelm_decode_step's) is named by its fields alone */
        if (n > 1) snprintf(prefix, sizeof prefix, "row %d: ", b);
        if (check_row(s, &rows[b], prefix)) return 1;
        max_len = rows[b].max_len > max_len ? rows[b].max_len : max_len;
    }
    const int64_t one = row_scratch(s, max_len), stride = (one + 15) / 16 * 16;
    const int64_t need = (n - 1) * stride + one;
    return check_buffer(s, "", "scratch", s->scratch, s->scratch_size, need, 1) || check_disjoint(s, rows, n, need)
        || (step_rows(s, rows, n, (size_t)stride), 0);
}

/* Feeds `byte` at position `pos` into the row that s holds (its max_len, k_cache, v_cache and logits): one row
 * of bytelm_decode_rows, which checks it. Returns 0, or 1 (nothing touched) with the reason in s->error. */
int bytelm_decode_step(DecodeStep *s, int pos, int byte) {
    if (!s) return 1;
    const DecodeRow row = {byte, pos, s->max_len, s->k_cache, s->k_cache_size, s->v_cache, s->v_cache_size,
                           s->logits, s->logits_size};
    return bytelm_decode_rows(s, &row, 1);
}
