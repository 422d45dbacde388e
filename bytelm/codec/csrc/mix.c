/* The context-mixing coder of bytelm compress: bitwise predictions of adaptive context models and of the
 * byte model's distribution, mixed by logistic mixers, refined by APM stages, coded by a binary arithmetic
 * coder. Integer arithmetic only, so any compiler, flag set or CPU gives the same bits (bytelm/codec/mixer.py
 * loads it; docs/compression.md describes it).
 *
 * The design follows the public descriptions of PAQ8/lpaq1 (Mahoney) and cmix (Knoll): hashed order-n
 * context models, a match model, mixers whose weight set a small context selects, APM/SSE refinement, a
 * 32-bit carryless arithmetic coder; the code is our own. What differs: the counters are adaptive-rate
 * probabilities (no bit-history state machines), and the byte model's 256 counts enter as the probability of
 * each bit given the bits of the byte so far.
 *
 * Rows: R rows code R contiguous runs of one block side by side. They share every table, and their bits are
 * coded in a fixed order (byte t of row 0, of row 1, ..., then byte t + 1), so encoder and decoder update the
 * tables in the same order. Each row keeps its own history hashes and match pointer. The block's bytes live in
 * one buffer (run r at [r * run_len, ...)) that the match model searches across rows, reading only bytes
 * already coded.
 *
 * Memory: one allocation (the arena) holds every table, so a snapshot is one memcpy: the encoder takes one
 * before a block and restores it when the block is stored instead (the decoder never sees that block's bits).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CM_VERSION 1
#define MAX_ROWS 256
#define N_ORDERS 8                    /* hashed orders 1, 2, 3, 4, 6, a word (letters) context, two sparse */
#define N_INPUTS (2 * N_ORDERS + 5)   /* two rates per order; + order 0, match, model, model via APM, bias */
#define CM_BITS 22                    /* slots per hashed table: 4M counters of 4 bytes, shared by the orders */
#define MATCH_BITS 20                 /* positions in the match model's hash table */
#define MATCH_MIN 6                   /* bytes hashed to find a match */
#define MAX_BLOCK (1 << 24)

typedef struct { uint32_t x1, x2, x; uint8_t *out; int64_t n, cap, pos; int overflow; } Coder;

typedef struct {
    uint32_t hist;                    /* last 4 bytes of the row, newest lowest */
    uint32_t hist2;                   /* the 4 before them */
    uint32_t word;                    /* hash of the current run of letters */
    uint32_t hash[N_ORDERS];          /* this byte's context hash per order */
    int32_t match_ptr, match_len;     /* where the match model predicts from (block offset), how long */
    int32_t start, len, done;         /* the row's run: first offset in the block, length, bytes coded */
} Row;

typedef struct {
    int32_t mixer_w[3][256][N_INPUTS];  /* weights 16.16; set [c0], set [expected bit x match length x model] */
    uint32_t order0[256 * 256];       /* c0 x previous byte: direct order-1/0 counters */
    uint32_t match_sm[64 * 2];        /* match length bucket x expected bit */
    uint16_t apm0[256][33];           /* refine the model's probability by c0 */
    uint16_t apm1[256][33];           /* refine the mixed probability by c0 */
    uint16_t apm2[1 << 16][33];       /* and by c0 | previous byte */
    uint32_t cm[1u << CM_BITS][2];    /* hashed contexts: an adaptive-rate counter, a fast fixed-rate one */
    int32_t match_table[1 << MATCH_BITS];
    Row rows[MAX_ROWS];
} Tables;

typedef struct {
    Tables *t;
    uint8_t *block;                   /* the block's bytes, filled as they are coded */
    int32_t block_len, run_len, n_rows;
    int32_t limit;                    /* counter adaptation limit */
    Coder coder;
    char error[160];
} CM;

static int16_t stretch_table[4096];
static int squash_ready = 0;
static int32_t recip[1024];

/* 1 / (1 + e^-x) for x = d / 256, d in -2047..2047, as a 12-bit probability: lpaq's interpolation of a table
 * of 33 points, integers only. */
static int squash(int d) {
    static const int t[33] = {1, 2, 3, 6, 10, 16, 27, 45, 73, 120, 194, 310, 488, 747, 1101, 1546, 2047, 2549,
                              2994, 3348, 3607, 3785, 3901, 3975, 4022, 4050, 4068, 4079, 4085, 4089, 4092, 4093,
                              4094};
    if (d > 2047) return 4095;
    if (d < -2047) return 1;
    int w = d & 127;
    d = (d >> 7) + 16;
    return (t[d] * (128 - w) + t[d + 1] * w + 64) >> 7;
}

static void init_tables(void) {
    if (squash_ready) return;
    int pi = 0;
    for (int x = -2047; x <= 2047; x++) {  /* stretch = squash^-1 */
        int v = squash(x);
        for (int j = pi; j <= v; j++) stretch_table[j] = (int16_t)x;
        pi = v + 1;
    }
    for (int j = pi; j < 4096; j++) stretch_table[j] = 2047;
    for (int n = 0; n < 1024; n++) recip[n] = (int32_t)(65536 * 2 / (2 * n + 3));  /* 1 / (n + 1.5) */
    squash_ready = 1;
}

static inline int stretch(int p) { return stretch_table[p]; }

static inline uint32_t hash32(uint32_t a, uint32_t b) {
    uint32_t h = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u) * 0x85EBCA77u;
    return h ^ (h >> 15);
}

/* counter: probability (22 bits) << 10 | count (10 bits); learns at rate 1 / (count + 1.5) down to 1 / limit */
static inline int counter_p(uint32_t c) { return (int)(c >> 20); }  /* 12-bit probability */

static inline void counter_update(uint32_t *c, int y, int limit) {
    uint32_t v = *c;
    int n = (int)(v & 1023);
    int p = (int)(v >> 10);
    int target = y ? (1 << 22) - 1 : 0;
    p += (int)(((int64_t)(target - p) * recip[n]) >> 16);
    if (n < limit) n++;
    *c = ((uint32_t)p << 10) | (uint32_t)n;
}

/* An APM: a probability refined by a context, interpolating between 33 buckets of the stretched input. */
static inline int apm_p(uint16_t *a, int pr, int *idx) {
    int s = stretch(pr) + 2048;  /* 0..4095 */
    int lo = s >> 7, w = s & 127;
    *idx = lo + (w >> 6);
    return (a[lo] * (128 - w) + a[lo + 1] * w) >> 11;
}

static inline void apm_update(uint16_t *a, int idx, int y) {
    int g = (y << 16) + (y << 6) - y - y;
    a[idx] += (g - a[idx]) >> 6;
}

/* ---- the arithmetic coder (carryless, 32-bit, as lpaq) ---- */

static void put_byte(Coder *c, uint8_t b) {
    if (c->n >= c->cap) { c->overflow = 1; return; }
    c->out[c->n++] = b;
}

/* Code bit y (decoding: return the decoded bit) with p, the 12-bit probability that it is 1. The interval
 * [x1, x2] splits at x1 + (x2 - x1) * p / 4096; leading bytes that x1 and x2 share are final. */
static int code_bit(Coder *c, int y, int p, int decoding) {
    uint32_t xmid = c->x1 + (uint32_t)(((uint64_t)(c->x2 - c->x1) * (uint32_t)p) >> 12);
    if (decoding) y = c->x <= xmid;
    if (y) c->x2 = xmid; else c->x1 = xmid + 1;
    while (((c->x1 ^ c->x2) & 0xff000000u) == 0) {
        if (!decoding) put_byte(c, (uint8_t)(c->x2 >> 24));
        c->x1 <<= 8;
        c->x2 = (c->x2 << 8) | 255;
        if (decoding) c->x = (c->x << 8) | (c->pos < c->n ? c->out[c->pos++] : 0);
    }
    return y;
}

/* ---- per-byte context set-up ---- */

static void row_contexts(Row *r) {
    uint32_t h = r->hist, h2 = r->hist2;
    r->hash[0] = hash32(1, h & 0xff);
    r->hash[1] = hash32(2, h & 0xffff);
    r->hash[2] = hash32(3, h & 0xffffff);
    r->hash[3] = hash32(4, h);
    r->hash[4] = hash32(hash32(6, h), h2 & 0xffff);
    r->hash[5] = hash32(7, r->word ^ (h & 0xff) << 24);
    r->hash[6] = hash32(8, h & 0xffff00);  /* bytes 2 and 3 back: records, tables, binary structures */
    r->hash[7] = hash32(9, (h & 0xff00) | (h2 & 0xff) << 16);  /* bytes 2 and 5 back */
}

static inline int known(const CM *m, int32_t q, int row, int t) {
    /* whether block offset q has been coded when row `row` codes its byte t */
    if (q < 0 || q >= m->block_len) return 0;
    int r = q / m->run_len, off = q - r * m->run_len;
    return off < t || (off == t && r < row);
}

static void row_update(CM *m, int row, int t, uint8_t byte) {
    Row *r = &m->t->rows[row];
    r->hist2 = (r->hist2 << 8) | (r->hist >> 24);
    r->hist = (r->hist << 8) | byte;
    int letter = (byte | 32) >= 'a' && (byte | 32) <= 'z';
    r->word = letter ? hash32(r->word, byte | 32) : 0;
    int32_t at = r->start + t;
    r->done = t + 1;
    /* the match model: follow the match, or look for one when there is none */
    if (r->match_len > 0 && m->block[r->match_ptr] == byte && known(m, r->match_ptr + 1, row, t + 1)) {
        r->match_len += r->match_len < 65535;
        r->match_ptr++;
    } else {
        r->match_len = 0;
    }
    if (t + 1 >= MATCH_MIN) {
        uint32_t h = hash32(r->hist, r->hist2 & 0xffff) >> (32 - MATCH_BITS);
        if (r->match_len == 0) {
            int32_t q = m->t->match_table[h];
            if (q > 0 && known(m, q, row, t + 1)) {
                int n = 0, qr = (q - 1) / m->run_len * m->run_len;  /* count back within both runs */
                while (n < 32 && q - 1 - n >= qr && at - n >= r->start && m->block[q - 1 - n] == m->block[at - n])
                    n++;
                if (n >= MATCH_MIN) { r->match_len = n; r->match_ptr = q; }
            }
        }
        m->t->match_table[h] = at + 1;
    }
    row_contexts(r);
}

/* ---- one byte of one row: 8 bits predicted, coded (or decoded) and learned ---- */

static int code_byte(CM *m, int row, int byte, const uint32_t *counts, int mode) {
    /* mode 0: encode `byte`; 1: decode; 2: learn only (no coder) */
    Tables *T = m->t;
    Row *r = &T->rows[row];
    uint32_t c1 = r->hist & 0xff;
    int expected = r->match_len > 0 ? m->block[r->match_ptr] : -1;
    int mlen = r->match_len > 15 ? 15 : r->match_len;
    int c0 = 1, lo = 0, hi = 256;  /* c0: the bits so far with a leading 1; [lo, hi): the bytes they allow */
    uint64_t sums[257];
    if (counts) {
        sums[0] = 0;
        for (int i = 0; i < 256; i++) sums[i + 1] = sums[i] + counts[i];
    }
    for (int bit = 7; bit >= 0; bit--) {
        int x[N_INPUTS], k = 0;
        uint32_t *slot[N_ORDERS];
        for (int i = 0; i < N_ORDERS; i++) {
            slot[i] = T->cm[(r->hash[i] + (uint32_t)c0 * 0x2F0B4C27u) >> (32 - CM_BITS)];
            x[k++] = stretch(counter_p(slot[i][0]));
            x[k++] = stretch(counter_p(slot[i][1]));
        }
        uint32_t *o0 = &T->order0[c0 << 8 | c1];
        x[k++] = stretch(counter_p(*o0));
        int ebit = -1;
        if (expected >= 0 && ((expected + 256) >> (bit + 1)) == c0) ebit = (expected >> bit) & 1;
        uint32_t *ms = ebit >= 0 ? &T->match_sm[(mlen * 2 + (r->match_len > 32)) * 2 + ebit] : 0;
        x[k++] = ms ? stretch(counter_p(*ms)) : 0;
        int pm = 2048, mid = (lo + hi) >> 1, bucket = 0;
        if (counts) {
            uint64_t all = sums[hi] - sums[lo], ones = sums[hi] - sums[mid];
            pm = (int)((ones * 4096 + all / 2) / (all ? all : 1));
            pm = pm < 1 ? 1 : pm > 4095 ? 4095 : pm;
            int s = stretch(pm);
            bucket = (s < 0 ? -s : s) >> 8;  /* the model's confidence, 0..7 */
        }
        int ia, pa = apm_p(T->apm0[c0], pm, &ia);
        x[k++] = counts ? stretch(pm) : 0;
        x[k++] = counts ? stretch(pa < 1 ? 1 : pa > 4095 ? 4095 : pa) : 0;
        x[k++] = 256;
        /* two mixers, weights chosen by the bits so far and by (match state, model confidence) */
        int32_t *w0 = T->mixer_w[0][c0], *w1 = T->mixer_w[1][(ebit + 1) * 64 + mlen * 4 + (bucket >> 1)];
        int32_t *w2 = T->mixer_w[2][c1];
        int64_t d0 = 0, d1 = 0, d2 = 0;
        for (int i = 0; i < N_INPUTS; i++) {
            d0 += (int64_t)x[i] * w0[i]; d1 += (int64_t)x[i] * w1[i]; d2 += (int64_t)x[i] * w2[i];
        }
        int s0 = (int)(d0 >> 16), s1 = (int)(d1 >> 16), s2 = (int)(d2 >> 16);
        s0 = s0 < -2047 ? -2047 : s0 > 2047 ? 2047 : s0;
        s1 = s1 < -2047 ? -2047 : s1 > 2047 ? 2047 : s1;
        s2 = s2 < -2047 ? -2047 : s2 > 2047 ? 2047 : s2;
        int p0 = squash(s0), p1 = squash(s1), p2 = squash(s2), pmix = squash((s0 + s1 + s2) / 3);
        int i1, i2, a1 = apm_p(T->apm1[c0], pmix, &i1), a2 = apm_p(T->apm2[c0 | c1 << 8], pmix, &i2);
        int p = (pmix + a1 + 2 * a2 + 2) >> 2;
        p = p < 1 ? 1 : p > 4095 ? 4095 : p;
        int y = (byte >> bit) & 1;
        if (mode != 2) y = code_bit(&m->coder, y, p, mode == 1);
        /* learn */
        for (int i = 0; i < N_ORDERS; i++) {
            counter_update(&slot[i][0], y, m->limit);
            counter_update(&slot[i][1], y, 14);
        }
        counter_update(o0, y, 255);
        if (ms) counter_update(ms, y, 1023);
        apm_update(T->apm0[c0], ia, y);
        apm_update(T->apm1[c0], i1, y);
        apm_update(T->apm2[c0 | c1 << 8], i2, y);
        int e0 = (y << 12) - p0, e1 = (y << 12) - p1, e2 = (y << 12) - p2;  /* learning rate: error / 2048 */
        for (int i = 0; i < N_INPUTS; i++) {
            w0[i] += (x[i] * e0) >> 11; w1[i] += (x[i] * e1) >> 11; w2[i] += (x[i] * e2) >> 11;
        }
        c0 = c0 << 1 | y;
        if (y) lo = mid; else hi = mid;
    }
    return c0 & 255;
}

/* ---- the entry points (bytelm/codec/mixer.py) ---- */

int cm_version(void) { return CM_VERSION; }
int cm_max_rows(void) { return MAX_ROWS; }
size_t cm_tables_size(void) { return sizeof(Tables); }

static void init_apm(uint16_t *a, int n) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < 33; j++) a[i * 33 + j] = (uint16_t)(squash((j - 16) * 128) * 16);
}

/* A coder with fresh tables; `limit` caps the counters' count (their slowest rate is 1 / (limit + 1.5)). */
CM *cm_new(int limit) {
    init_tables();
    CM *m = calloc(1, sizeof(CM));
    if (!m) return 0;
    m->t = calloc(1, sizeof(Tables));
    if (!m->t) { free(m); return 0; }
    m->limit = limit < 1 ? 1 : limit > 1023 ? 1023 : limit;
    Tables *T = m->t;
    for (size_t i = 0; i < (1u << CM_BITS); i++) T->cm[i][0] = T->cm[i][1] = (uint32_t)1 << 31;  /* p = 1/2 */
    for (int i = 0; i < 256 * 256; i++) T->order0[i] = (uint32_t)1 << 31;
    for (int i = 0; i < 128; i++) T->match_sm[i] = (uint32_t)1 << 31;
    init_apm(&T->apm0[0][0], 256);
    init_apm(&T->apm1[0][0], 256);
    init_apm(&T->apm2[0][0], 1 << 16);
    for (int s = 0; s < 3; s++)
        for (int c = 0; c < 256; c++)
            for (int i = 0; i < N_INPUTS; i++) T->mixer_w[s][c][i] = (1 << 16) / 6;
    return m;
}

void cm_free(CM *m) {
    if (m) { free(m->t); free(m); }
}

/* Copy the tables out (snapshot) or back in (restore): the encoder restores them when it stores a block. */
void cm_copy_tables(CM *m, void *buf, int restore) {
    if (restore) memcpy(m->t, buf, sizeof(Tables)); else memcpy(buf, m->t, sizeof(Tables));
}

/* Start a block of `len` bytes coded as `rows` runs. block: the bytes (encoding) or where they go (decoding).
 * io: the coded bytes: written up to `cap` (encoding), or read, `io_len` of them (decoding). */
int cm_begin(CM *m, uint8_t *block, int32_t len, int32_t rows, uint8_t *io, int64_t cap, int decoding) {
    if (len < 0 || len > MAX_BLOCK || rows < 1 || rows > MAX_ROWS) {
        strcpy(m->error, "block length or row count out of range");
        return -1;
    }
    m->block = block;
    m->block_len = len;
    m->run_len = len ? (len + rows - 1) / rows : 1;
    m->n_rows = rows;
    for (int r = 0; r < rows; r++) {
        Row *row = &m->t->rows[r];
        memset(row, 0, sizeof(Row));
        row->start = r * m->run_len;
        int32_t end = row->start + m->run_len;
        row->len = row->start >= len ? 0 : (end > len ? len : end) - row->start;
        row_contexts(row);
    }
    memset(m->t->match_table, 0, sizeof(m->t->match_table));
    Coder *c = &m->coder;
    c->x1 = 0; c->x2 = 0xffffffffu; c->x = 0; c->out = io; c->pos = 0; c->overflow = 0;
    c->cap = cap; c->n = decoding ? cap : 0;
    if (decoding)
        for (int i = 0; i < 4; i++) c->x = (c->x << 8) | (c->pos < c->n ? c->out[c->pos++] : 0);
    return 0;
}

/* Byte t of every row that has one: counts (rows, 256) the model's integer distribution per row (NULL: no
 * model), mode 0 encode, 1 decode, 2 learn only. Returns 0, or 1 once the encoder's output passed `cap`. */
int cm_step(CM *m, int32_t t, const uint32_t *counts, int mode) {
    for (int r = 0; r < m->n_rows; r++) {
        Row *row = &m->t->rows[r];
        if (t >= row->len) break;  /* runs are in order of length: the rest are done too */
        int32_t at = row->start + t;
        int b = code_byte(m, r, m->block[at], counts ? counts + (size_t)r * 256 : 0, mode);
        if (mode == 1) m->block[at] = (uint8_t)b;
        row_update(m, r, t, (uint8_t)b);
    }
    return m->coder.overflow;
}

/* Every step of the block with no model (pure context mixing). Returns as cm_step. */
int cm_run(CM *m, int mode) {
    for (int32_t t = 0; t < m->run_len; t++)
        if (cm_step(m, t, 0, mode)) return 1;
    return 0;
}

/* End an encoded block: flush the coder; returns the coded length, or -1 if it passed `cap`. */
int64_t cm_finish(CM *m) {
    Coder *c = &m->coder;
    for (int i = 0; i < 4; i++) { put_byte(c, (uint8_t)(c->x1 >> 24)); c->x1 <<= 8; }
    return c->overflow ? -1 : c->n;
}

/* Bytes of coded input the decoder has consumed (more than it was given means damage). */
int64_t cm_consumed(CM *m) { return m->coder.pos; }

const char *cm_error(CM *m) { return m->error; }
