/* A stand-alone driver of bytelm/codec/csrc/model_step.c for tests/test_model_step.py: runs the step where
 * Python can't, e.g. an ARM64 build under qemu-user, and prints the counts for the test to compare.
 *
 *     driver < input > counts
 *
 * input (little-endian): int32 n_layer, C, H, F, V, T (context), value_embeds, rows, steps, stride; float eps,
 * qk_eps; double rope_base; then float32 embed, [value_embed], norm1, w_qkv, w_proj, norm2, w_fc, w_out,
 * norm_f, head in model_step.c's layouts; then the rows' inputs, uint8 (rows, steps), the separator first.
 * output: uint32 counts (steps, rows, V), each step's as DeterministicStep.next returns them (the same
 * sliding: when the window is full, the kept context - stride inputs are re-encoded first).
 */
#include "../bytelm/codec/csrc/model_step.c"

static void *read_all(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, stdin) != n) { fprintf(stderr, "driver: short input\n"); exit(2); }
    return p;
}

int main(void) {
    int32_t h[10];
    float eps[2];
    double base;
    if (fread(h, 4, 10, stdin) != 10 || fread(eps, 4, 2, stdin) != 2 || fread(&base, 8, 1, stdin) != 1) return 2;
    const int64_t L = h[0], C = h[1], H = h[2], F = h[3], V = h[4], T = h[5], R = h[7], steps = h[8];
    const int stride = h[9], half = (int)(C / H / 2);
    DetModel m = {.n_layer = h[0], .C = h[1], .H = h[2], .F = h[3], .V = h[4], .context = h[5],
                  .value_embeds = h[6], .eps = eps[0], .qk_eps = eps[1]};
#define READ(name, n) (m.name = read_all(sizeof(float) * (size_t)(n)), m.name##_size = (n))
    READ(embed, V * C);
    if (h[6]) READ(value_embed, V * L * C);
    READ(norm1, L * C); READ(w_qkv, L * C * 3 * C); READ(w_proj, L * C * C); READ(norm2, L * C);
    READ(w_fc, L * C * F); READ(w_out, L * F * C); READ(norm_f, C); READ(head, C * V);
    float *cs = malloc(sizeof(float) * T * half), *sn = malloc(sizeof(float) * T * half);
    if (detstep_rope(cs, sn, T * half, (int32_t)T, half, base)) return 3;
    m.rope_cos = cs; m.rope_sin = sn; m.rope_cos_size = m.rope_sin_size = T * half;
    uint8_t *data = read_all((size_t)(R * steps));
    float *keys = calloc((size_t)(R * L * C * T), 4), *values = calloc((size_t)(R * L * C * T), 4);
    uint8_t *history = malloc((size_t)(R * T)), *tokens = malloc((size_t)(R * T));
    uint32_t *counts = malloc(sizeof(uint32_t) * R * V);
    int fill = 0;
    for (int64_t s = 0; s < steps; s++) {
        if (fill == T) {  /* slide: the kept inputs, re-encoded at positions 0 .. kept - 1 */
            int kept = (int)T - stride;
            for (int64_t r = 0; r < R; r++) memmove(history + r * T, history + r * T + stride, (size_t)kept);
            if (kept > 0) {
                for (int64_t r = 0; r < R; r++) memcpy(tokens + r * kept, history + r * T, (size_t)kept);
                DetCall c = {.rows = (int32_t)R, .tokens = kept, .pos = 0, .threads = 2, .token = tokens,
                             .keys = keys, .values = values, .token_size = R * kept, .keys_size = R * L * C * T,
                             .values_size = R * L * C * T};
                if (detstep_forward(&m, &c)) { fprintf(stderr, "driver: %s\n", c.error); return 4; }
            }
            fill = kept;
        }
        for (int64_t r = 0; r < R; r++) tokens[r] = history[r * T + fill] = data[r * steps + s];
        DetCall c = {.rows = (int32_t)R, .tokens = 1, .pos = fill, .threads = 2, .token = tokens, .keys = keys,
                     .values = values, .counts = counts, .token_size = R, .keys_size = R * L * C * T,
                     .values_size = R * L * C * T, .counts_size = R * V};
        if (detstep_forward(&m, &c)) { fprintf(stderr, "driver: %s\n", c.error); return 4; }
        fill++;
        fwrite(counts, sizeof(uint32_t), (size_t)(R * V), stdout);
    }
    return 0;
}
