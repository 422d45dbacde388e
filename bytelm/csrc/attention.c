/* Causal self-attention for training, forward and backward, fp32 on the CPU (bytelm/attention.py wraps it as
 * a torch op with autograd; tests/test_attention.py checks it against scaled_dot_product_attention).
 *
 * Why: at the shapes trained here (T = 128-512, head size 24-40) torch's CPU flash attention runs far below the
 * machine's matmul speed; see docs/training.md, "Attention", for the measurements. Per (batch, head) pair, the
 * keys (and for the backward the values) are transposed once, so that query rows can be taken four at a time
 * against sixteen keys with no sum reduced across vector lanes (tile_products); the weighted sums of rows keep
 * four rows' outputs in registers (tile_weighted). The backward recomputes the attention weights from each
 * query's saved log-normaliser, as FlashAttention does, so no (T, T) matrix is ever stored.
 *
 * Layouts: q, k, v: element (b, t, h, d) at x + (b T + t) rs + h D + d, each tensor with its own row stride rs
 * (so q, k and v can be read in place from a fused (B, T, 3, H, D) projection); out, dout, dq, dk, dv:
 * contiguous (B, T, H, D); lse: (B, H, T). The (b, h) pairs are shared out over `threads` OpenMP threads.
 * Head sizes must be multiples of 8. */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "attend.h"

/* Whether this build has the kernel (x86 with AVX2 and FMA); without it the caller uses torch. */
int bytelm_attention_supported(void) { return BYTELM_AVX2; }

#if BYTELM_AVX2
#define ROWS 4  /* query rows per tile */

typedef struct {
    int B, T, H, D, backward;
    float scale;
    const float *q, *k, *v, *out, *dout, *lse;
    size_t qs, ks, vs;
    float *out_w, *lse_w, *dq, *dk, *dv;
    float *scratch;  /* scratch_floats(T, D) */
} Job;

static int padded(int T) { return (T + 15) & ~15; }  /* columns of a transposed head: whole 16-column tiles */

static size_t scratch_floats(int T, int D) { return (size_t)padded(T) * (2 * (size_t)D + 2 * ROWS); }

/* xt (D, tp) = the transpose of x (n, D) with rows xs floats apart; columns n..tp-1 zero */
static void transpose(const float *x, size_t xs, int n, int D, float *xt, int tp) {
    for (int d = 0; d < D; d++) {
        float *row = xt + (size_t)d * tp;
        for (int j = 0; j < n; j++) row[j] = x[(size_t)j * xs + d];
        for (int j = n; j < tp; j++) row[j] = 0.0f;
    }
}

/* s[r][j] = scale * x_r . y_j for r < ROWS, j < n16 (a multiple of 16); yt (D, tp) the y rows transposed, s rows
 * tp floats apart. Each tile is ROWS rows by 16 columns: per d, two loads of yt and ROWS broadcasts feed 2 ROWS
 * FMAs, and no sum is reduced across vector lanes. */
static void tile_products(const float *const x[ROWS], const float *yt, int tp, int n16, int D, float scale,
                          float *s) {
    const __m256 s8 = _mm256_set1_ps(scale);
    for (int j = 0; j < n16; j += 16) {
        __m256 a[ROWS][2];
        for (int r = 0; r < ROWS; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            const float *yd = yt + (size_t)d * tp + j;
            const __m256 y0 = _mm256_loadu_ps(yd), y1 = _mm256_loadu_ps(yd + 8);
            for (int r = 0; r < ROWS; r++) {
                const __m256 xr = _mm256_broadcast_ss(x[r] + d);
                a[r][0] = _mm256_fmadd_ps(xr, y0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(xr, y1, a[r][1]);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            _mm256_storeu_ps(s + (size_t)r * tp + j, _mm256_mul_ps(a[r][0], s8));
            _mm256_storeu_ps(s + (size_t)r * tp + j + 8, _mm256_mul_ps(a[r][1], s8));
        }
    }
}

/* out_r[c : c + 8 nv] = scale_r sum_{j < n} w[r][j] rows_j[c : c + 8 nv] for r < ROWS; nv (1-3) a constant after
 * inlining, so the 3 ROWS sums stay in registers; w rows tp floats apart */
static inline __attribute__((always_inline)) void tile_weighted_chunk(const float *w, int tp, const float *rows,
                                                                      size_t rs, int n, int c, int nv,
                                                                      const float scale[ROWS],
                                                                      float *const out[ROWS]) {
    __m256 a[ROWS][3];
    for (int r = 0; r < ROWS; r++) a[r][0] = a[r][1] = a[r][2] = _mm256_setzero_ps();
    for (int j = 0; j < n; j++) {
        const float *row = rows + (size_t)j * rs + c;
        __m256 y[3];
        for (int u = 0; u < nv; u++) y[u] = _mm256_loadu_ps(row + 8 * u);
        for (int r = 0; r < ROWS; r++) {
            const __m256 p = _mm256_broadcast_ss(w + (size_t)r * tp + j);
            for (int u = 0; u < nv; u++) a[r][u] = _mm256_fmadd_ps(p, y[u], a[r][u]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int u = 0; u < nv; u++)
            _mm256_storeu_ps(out[r] + c + 8 * u, _mm256_mul_ps(a[r][u], _mm256_set1_ps(scale[r])));
}

static void tile_weighted(const float *w, int tp, const float *rows, size_t rs, int n, int D,
                          const float scale[ROWS], float *const out[ROWS]) {
    for (int c = 0; c < D; c += 24) {
        switch ((D - c) / 8) {
            case 1: tile_weighted_chunk(w, tp, rows, rs, n, c, 1, scale, out); break;
            case 2: tile_weighted_chunk(w, tp, rows, rs, n, c, 2, scale, out); break;
            default: tile_weighted_chunk(w, tp, rows, rs, n, c, 3, scale, out); break;
        }
    }
}

/* One (b, h) pair. Query rows go ROWS at a time; rows past T are stand-ins (row T - 1) whose results are
 * written to a scratch row. Row r of a tile sees keys 0 .. i0 + r; its later columns get weight 0. */
static void forward_pair(const Job *j, int b, int h) {
    const int T = j->T, H = j->H, D = j->D, tp = padded(T);
    const float *q = j->q + (size_t)b * T * j->qs + (size_t)h * D;
    const float *k = j->k + (size_t)b * T * j->ks + (size_t)h * D;
    const float *v = j->v + (size_t)b * T * j->vs + (size_t)h * D;
    float *lse = j->lse_w + ((size_t)b * H + h) * T;
    float *kt = j->scratch, *s = kt + (size_t)D * tp, *spare = s + (size_t)ROWS * tp;  /* (D, tp), (ROWS, tp), D */
    transpose(k, j->ks, T, D, kt, tp);
    for (int i0 = 0; i0 < T; i0 += ROWS) {
        const int n = i0 + ROWS < T ? i0 + ROWS : T, n16 = (n + 15) & ~15;  /* keys any row of the tile sees */
        const float *x[ROWS];
        float *out[ROWS], scale[ROWS];
        for (int r = 0; r < ROWS; r++) {
            const int i = i0 + r < T ? i0 + r : T - 1;
            x[r] = q + (size_t)i * j->qs;
            out[r] = i0 + r < T ? j->out_w + (((size_t)b * T + i) * H + h) * D : spare;
        }
        tile_products(x, kt, tp, n16, D, j->scale, s);
        for (int r = 0; r < ROWS; r++) {
            float *sr = s + (size_t)r * tp;
            const int seen = i0 + r < T ? i0 + r + 1 : 1;
            const float top = max_of(sr, seen), total = exp_masked(sr, seen, (n + 7) & ~7, top);
            scale[r] = 1.0f / total;
            if (i0 + r < T) lse[i0 + r] = top + logf(total);
        }
        tile_weighted(s, tp, v, j->vs, n, D, scale, out);
    }
}

/* For query i, with p_j = e^(scale q_i . k_j - lse_i) and delta_i = dout_i . out_i:
 *   ds_j = p_j (dout_i . v_j - delta_i); dq_i = scale sum_j ds_j k_j; dk_j += scale ds_j q_i; dv_j += p_j dout_i
 * in tiles of ROWS queries, as the forward; each row of dk and dv is loaded and stored once per tile. */
static void backward_pair(const Job *j, int b, int h) {
    const int T = j->T, H = j->H, D = j->D, tp = padded(T);
    const size_t row = (size_t)H * D;  /* row stride of the contiguous tensors */
    const float *q = j->q + (size_t)b * T * j->qs + (size_t)h * D;
    const float *k = j->k + (size_t)b * T * j->ks + (size_t)h * D;
    const float *v = j->v + (size_t)b * T * j->vs + (size_t)h * D;
    const size_t at = ((size_t)b * T) * row + (size_t)h * D;  /* (b, 0, h, 0) in the contiguous tensors */
    const float *out = j->out + at, *dout = j->dout + at, *lse = j->lse + ((size_t)b * H + h) * T;
    float *dq = j->dq + at, *dk = j->dk + at, *dv = j->dv + at;
    float *kt = j->scratch, *vt = kt + (size_t)D * tp;         /* (D, tp) each */
    float *p = vt + (size_t)D * tp, *ds = p + (size_t)ROWS * tp;  /* (ROWS, tp) each */
    transpose(k, j->ks, T, D, kt, tp);
    transpose(v, j->vs, T, D, vt, tp);
    for (int i = 0; i < T; i++) {
        memset(dk + (size_t)i * row, 0, (size_t)D * sizeof(float));
        memset(dv + (size_t)i * row, 0, (size_t)D * sizeof(float));
    }
    for (int i0 = 0; i0 < T; i0 += ROWS) {
        const int rows = T - i0 < ROWS ? T - i0 : ROWS, n = i0 + rows, n16 = (n + 15) & ~15;
        const float *qr[ROWS], *gr[ROWS];
        float *dqr[ROWS], scale[ROWS];
        for (int r = 0; r < ROWS; r++) {
            const int i = i0 + (r < rows ? r : 0);
            qr[r] = q + (size_t)i * j->qs;
            gr[r] = dout + (size_t)i * row;
            dqr[r] = dq + (size_t)i * row;
            scale[r] = j->scale;
        }
        tile_products(qr, kt, tp, n16, D, j->scale, p);  /* scores, then the forward's weights */
        tile_products(gr, vt, tp, n16, D, 1.0f, ds);     /* dout_i . v_j, then ds */
        const int width = (n + 7) & ~7;
        for (int r = 0; r < ROWS; r++) {
            float *pr = p + (size_t)r * tp, *dsr = ds + (size_t)r * tp;
            const int i = i0 + r, seen = r < rows ? i + 1 : 0;  /* a stand-in row gets no weight anywhere */
            float delta = 0.0f;
            if (r < rows) dots(gr[r], out + (size_t)i * row, 0, 1, D, 1.0f, &delta);
            exp_masked(pr, seen, width, r < rows ? lse[i] : 0.0f);  /* the forward's weights; 0 after key i */
            const __m256 delta8 = _mm256_set1_ps(delta);
            for (int t = 0; t < width; t += 8)
                _mm256_storeu_ps(dsr + t, _mm256_mul_ps(_mm256_loadu_ps(pr + t),
                                                        _mm256_sub_ps(_mm256_loadu_ps(dsr + t), delta8)));
        }
        if (rows == ROWS) {
            tile_weighted(ds, tp, k, j->ks, n, D, scale, dqr);
        } else {  /* the last, partial tile: stand-in rows would overwrite real rows of dq */
            for (int r = 0; r < rows; r++) weighted_rows(ds + (size_t)r * tp, k, j->ks, n, D, j->scale, dqr[r]);
        }
        const __m256 scale8 = _mm256_set1_ps(j->scale);
        for (int d = 0; d < D; d += 8) {  /* dk_t += scale sum_r ds_r[t] q_r; dv_t += sum_r p_r[t] dout_r */
            __m256 qd[ROWS], gd[ROWS];
            for (int r = 0; r < ROWS; r++) {
                qd[r] = _mm256_mul_ps(scale8, _mm256_loadu_ps(qr[r] + d));
                gd[r] = _mm256_loadu_ps(gr[r] + d);
            }
            for (int t = 0; t < n; t++) {
                float *dkt = dk + (size_t)t * row + d, *dvt = dv + (size_t)t * row + d;
                __m256 k_acc = _mm256_loadu_ps(dkt), v_acc = _mm256_loadu_ps(dvt);
                for (int r = 0; r < ROWS; r++) {
                    k_acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ds + (size_t)r * tp + t), qd[r], k_acc);
                    v_acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + (size_t)r * tp + t), gd[r], v_acc);
                }
                _mm256_storeu_ps(dkt, k_acc);
                _mm256_storeu_ps(dvt, v_acc);
            }
        }
    }
}

/* Runs `base` over `threads` OpenMP threads, each on a run of consecutive (b, h) pairs (workers on neighbouring
 * heads of one row would share its cache lines). Built with -fopenmp, the library uses the OpenMP runtime torch
 * has already loaded (the same libgomp.so.1), so these are torch's own worker threads: a second set of threads
 * would wait for cores that torch's workers keep busy spinning for milliseconds after each of torch's
 * parallel calls (measured: twice the time). Built without OpenMP it runs on the calling thread.
 * Returns 0, or 1 if out of memory. */
static int run(const Job *base, int threads) {
    const int pairs = base->B * base->H;
    int failed = 0;
    threads = threads < 1 ? 1 : threads > pairs ? pairs : threads;
#pragma omp parallel num_threads(threads)
    {
        int w = 0, n = 1;
#ifdef _OPENMP
        w = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        Job job = *base;
        job.scratch = malloc(sizeof(float) * (scratch_floats(base->T, base->D) + (size_t)base->D));
        if (!job.scratch) {
#pragma omp atomic write
            failed = 1;
        } else {
            for (int pair = (int)((long)pairs * w / n); pair < (int)((long)pairs * (w + 1) / n); pair++) {
                if (job.backward) backward_pair(&job, pair / job.H, pair % job.H);
                else forward_pair(&job, pair / job.H, pair % job.H);
            }
            free(job.scratch);
        }
    }
    return failed;
}
#endif

/* out (B, T, H, D), lse (B, H, T) from q, k, v. Returns 0, 1 (out of memory) or 2 (unsupported: D % 8, no AVX2). */
int bytelm_attention_forward(int B, int T, int H, int D, float scale, int threads,
                             const float *q, long qs, const float *k, long ks, const float *v, long vs,
                             float *out, float *lse) {
#if BYTELM_AVX2
    if (D % 8 || B < 1 || T < 1 || H < 1) return 2;
    Job job = {.B = B, .T = T, .H = H, .D = D, .backward = 0, .scale = scale, .q = q, .k = k, .v = v,
               .qs = (size_t)qs, .ks = (size_t)ks, .vs = (size_t)vs, .out_w = out, .lse_w = lse};
    return run(&job, threads);
#else
    (void)B; (void)T; (void)H; (void)D; (void)scale; (void)threads; (void)q; (void)qs; (void)k; (void)ks;
    (void)v; (void)vs; (void)out; (void)lse;
    return 2;
#endif
}

/* dq, dk, dv (B, T, H, D) from the forward's inputs, its out and lse, and dout. Returns as the forward does. */
int bytelm_attention_backward(int B, int T, int H, int D, float scale, int threads,
                              const float *q, long qs, const float *k, long ks, const float *v, long vs,
                              const float *out, const float *lse, const float *dout,
                              float *dq, float *dk, float *dv) {
#if BYTELM_AVX2
    if (D % 8 || B < 1 || T < 1 || H < 1) return 2;
    Job job = {.B = B, .T = T, .H = H, .D = D, .backward = 1, .scale = scale, .q = q, .k = k, .v = v,
               .qs = (size_t)qs, .ks = (size_t)ks, .vs = (size_t)vs, .out = out, .lse = lse, .dout = dout,
               .dq = dq, .dk = dk, .dv = dv};
    return run(&job, threads);
#else
    (void)B; (void)T; (void)H; (void)D; (void)scale; (void)threads; (void)q; (void)qs; (void)k; (void)ks;
    (void)v; (void)vs; (void)out; (void)lse; (void)dout; (void)dq; (void)dk; (void)dv;
    return 2;
#endif
}
