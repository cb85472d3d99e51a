/* Token-IVF list score (craterlab.retrieval.list_score): for one query, walk each query
 * token's probed inverted lists in the order given (best centroid first); an image gets, for
 * that token, the value of the first list it appears in; values are summed over tokens.
 *
 *   offsets (C+1) int64, ids (postings) int32: list c is ids[offsets[c] .. offsets[c+1]);
 *   cap > 0 reads only a list's first cap postings (impact-ordered lists: its best ones).
 *   probes (T, P) int32 centroid ids, vals (T, P) float32 (already minus the token's fill).
 *   slot (N) per image: its running sum and its token stamp side by side (one cache line per
 *   posting, where two arrays cost two misses on a large gallery); sums all zero on entry and
 *   on return; an image already scored for token t holds stamp base + t; base + T <=
 *   INT32_MAX and every stamp < base on entry.
 *   Writes the touched images and their sums to out_ids / out_vals; returns how many.
 */
#include <stdint.h>

typedef struct {
    float acc;
    int32_t stamp;
} slot_t;

int64_t craterlab_list_score(const int64_t *offsets, const int32_t *ids, const int32_t *probes,
                             const float *vals, int64_t T, int64_t P, slot_t *slot, int32_t base,
                             int32_t *out_ids, float *out_vals, int64_t cap) {
    int64_t n_out = 0;
    for (int64_t t = 0; t < T; t++) {
        const int32_t mark = base + (int32_t)t;
        for (int64_t p = 0; p < P; p++) {
            const int32_t c = probes[t * P + p];
            const float v = vals[t * P + p];
            const int32_t *list = ids + offsets[c];
            int64_t len = offsets[c + 1] - offsets[c];
            if (cap > 0 && len > cap) len = cap;
            for (int64_t j = 0; j < len; j++) {
                slot_t *e = slot + list[j];
                const int32_t s = e->stamp;
                if (s == mark) continue;              /* scored for this token by a better list */
                if (s < base) out_ids[n_out++] = list[j]; /* first touch in this query */
                e->stamp = mark;
                e->acc += v;
            }
        }
    }
    for (int64_t j = 0; j < n_out; j++) {
        out_vals[j] = slot[out_ids[j]].acc;
        slot[out_ids[j]].acc = 0.0f;
    }
    return n_out;
}

/* a ranks below b: a lower value, or an equal value and a higher image id */
static int worse(float va, int32_t ia, float vb, int32_t ib) {
    return va < vb || (va == vb && ia > ib);
}

static void sift_down(float *hv, int32_t *hi, int64_t n, int64_t i) {
    for (;;) {
        int64_t w = i, l = 2 * i + 1, r = l + 1;
        if (l < n && worse(hv[l], hi[l], hv[w], hi[w])) w = l;
        if (r < n && worse(hv[r], hi[r], hv[w], hi[w])) w = r;
        if (w == i) return;
        float tv = hv[i]; hv[i] = hv[w]; hv[w] = tv;
        int32_t ti = hi[i]; hi[i] = hi[w]; hi[w] = ti;
        i = w;
    }
}

/* The s best of m (image, value) pairs, best first (ties: lower image first), into
 * best_ids / best_vals (room for s); returns how many (min(s, m)). A heap of the s best so
 * far, its worst at the root: one comparison for most of the m pairs. */
int64_t craterlab_top_s(const int32_t *ids, const float *vals, int64_t m, int64_t s,
                        int32_t *best_ids, float *best_vals) {
    int64_t n = 0;
    for (int64_t j = 0; j < m; j++) {
        if (n < s) {
            int64_t i = n++;
            best_vals[i] = vals[j];
            best_ids[i] = ids[j];
            while (i > 0) { /* sift up */
                int64_t up = (i - 1) / 2;
                if (!worse(best_vals[i], best_ids[i], best_vals[up], best_ids[up])) break;
                float tv = best_vals[i]; best_vals[i] = best_vals[up]; best_vals[up] = tv;
                int32_t ti = best_ids[i]; best_ids[i] = best_ids[up]; best_ids[up] = ti;
                i = up;
            }
        } else if (worse(best_vals[0], best_ids[0], vals[j], ids[j])) {
            best_vals[0] = vals[j];
            best_ids[0] = ids[j];
            sift_down(best_vals, best_ids, n, 0);
        }
    }
    for (int64_t k = n - 1; k > 0; k--) { /* heap sort: the worst goes last */
        float tv = best_vals[0]; best_vals[0] = best_vals[k]; best_vals[k] = tv;
        int32_t ti = best_ids[0]; best_ids[0] = best_ids[k]; best_ids[k] = ti;
        sift_down(best_vals, best_ids, k, 0);
    }
    return n;
}
