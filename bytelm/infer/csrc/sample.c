/* Choosing the next byte from one row of logits, in C: the same filters in the same (HuggingFace) order as
 * bytelm/sampling.py's sample_next, and the same draw, so a seed gives the same bytes on either path (up to
 * float rounding exactly at a filter's threshold).
 *
 * Why: in torch each of the ~20 operations on 256 numbers costs microseconds of dispatch, 0.1-0.4 ms per byte
 * in all, as much as a whole C decode step; here the whole choice takes a few microseconds.
 *
 * The draw is inverse-CDF: the first byte whose cumulative probability (summed in double, as torch's cumsum
 * does for float) exceeds u times the total, for a uniform u in [0, 1) the caller draws from its
 * torch.Generator. Comparisons are made in float where torch makes them in float (a float tensor against a
 * Python number), so the kept sets agree.
 */
#include <math.h>
#include <stdlib.h>

#define MAX_VOCAB 256

typedef struct { float value; int index; } Scored;

/* Descending by value, ties by index descending: a total order, so the result never depends on qsort's
 * internals, and the reverse of the stable ascending torch.sort in sample_next's nucleus filter, which walks
 * it from the low end: tied bytes are cut in the same order on both paths. */
static int by_value_descending(const void *a, const void *b) {
    const Scored *x = a, *y = b;
    if (x->value != y->value) return x->value < y->value ? 1 : -1;
    return y->index - x->index;
}

/* probs = softmax(logits) in float; returns the largest probability */
static float softmax(const float *logits, float *probs, int n) {
    float top = -INFINITY;
    for (int i = 0; i < n; i++) top = logits[i] > top ? logits[i] : top;
    float total = 0.0f;
    for (int i = 0; i < n; i++) { probs[i] = expf(logits[i] - top); total += probs[i]; }
    for (int i = 0; i < n; i++) probs[i] /= total;
    return 1.0f / total;
}

/* logits_in (V): untouched. recent (n_recent): the bytes the repetition penalty applies to.
 * temperature 0 = greedy (argmax after the penalty; u unused). top_k <= 0 or >= V, top_p >= 1, min_p <= 0 and
 * penalty == 1 each switch their filter off. Returns the byte, or a negative code (nothing read) for a call it
 * refuses: -1 V not in 1..256 or no logits, -2 recent missing or n_recent < 0, -3 a setting out of range
 * (temperature < 0, penalty <= 0, min_p > 1, or NaN), -4 u outside [0, 1), -5 a logit that is NaN or infinite
 * (checked in the copy below, so the caller need not scan the logits first). */
int bytelm_sample(const float *logits_in, int V, const unsigned char *recent, int n_recent, float penalty,
                  float temperature, int top_k, double top_p, double min_p, double u) {
    if (!logits_in || V <= 0 || V > MAX_VOCAB) return -1;
    if (n_recent < 0 || (n_recent > 0 && !recent)) return -2;
    if (!(temperature >= 0.0f) || !(penalty > 0.0f) || top_p != top_p || !(min_p <= 1.0)) return -3;
    if (!(u >= 0.0 && u < 1.0)) return -4;
    float logits[MAX_VOCAB], probs[MAX_VOCAB];
    for (int i = 0; i < V; i++) {
        if (!isfinite(logits_in[i])) return -5;
        logits[i] = logits_in[i];
    }

    /* repetition penalty: once per distinct byte, however often it occurs */
    if (penalty != 1.0f && n_recent > 0) {
        unsigned char seen[MAX_VOCAB] = {0};
        for (int j = 0; j < n_recent; j++) {
            int b = recent[j];
            if (b >= V || seen[b]) continue;
            seen[b] = 1;
            logits[b] = logits[b] > 0.0f ? logits[b] / penalty : logits[b] * penalty;
        }
    }
    if (temperature == 0.0f) {  /* greedy: the first of the largest, as torch.argmax */
        int best = 0;
        for (int i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
        return best;
    }
    if (temperature != 1.0f)
        for (int i = 0; i < V; i++) logits[i] /= temperature;

    int use_k = top_k > 0 && top_k < V, use_p = top_p < 1.0;
    if (use_k || use_p) {
        Scored sorted[MAX_VOCAB];
        for (int i = 0; i < V; i++) { sorted[i].value = logits[i]; sorted[i].index = i; }
        qsort(sorted, V, sizeof(Scored), by_value_descending);
        int kept = V;
        if (use_k) {  /* keep the k largest and any ties with the k-th */
            float kth = sorted[top_k - 1].value;
            while (kept > top_k && sorted[kept - 1].value < kth) kept--;
            for (int j = kept; j < V; j++) { logits[sorted[j].index] = -INFINITY; sorted[j].value = -INFINITY; }
        }
        if (use_p) {  /* nucleus, as HF: drop the low tail whose total probability is at most 1 - p */
            float top = sorted[0].value, total = 0.0f;
            for (int j = 0; j < V; j++) { probs[j] = expf(sorted[j].value - top); total += probs[j]; }
            const float limit = (float)(1.0 - top_p);
            double cum = 0.0;
            for (int j = V - 1; j > 0; j--) {  /* ascending order; the most likely byte (j = 0) always stays */
                cum += (double)(probs[j] / total);
                if ((float)cum > limit) break;
                logits[sorted[j].index] = -INFINITY;
            }
        }
    }
    if (min_p > 0.0) {  /* drop bytes less likely than min_p x the most likely one */
        const float threshold = softmax(logits, probs, V) * (float)min_p;
        for (int i = 0; i < V; i++) if (probs[i] < threshold) logits[i] = -INFINITY;
    }

    softmax(logits, probs, V);
    double total = 0.0;
    for (int i = 0; i < V; i++) total += (double)probs[i];
    double target = u * total;
    if (target >= total) target = nextafter(total, 0.0);  /* u < 1, but the product can round up */
    double cum = 0.0;
    for (int i = 0; i < V; i++) {
        cum += (double)probs[i];
        if (cum > target) return i;  /* cum grew, so probs[i] > 0: a filtered byte is never drawn */
    }
    for (int i = V - 1; i > 0; i--) if (probs[i] > 0.0f) return i;  /* unreachable: target < total */
    return 0;
}
