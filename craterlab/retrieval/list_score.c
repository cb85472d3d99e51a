/* Token-IVF list score (craterlab.retrieval.list_score): for one query, walk each query
 * token's probed inverted lists in the order given (best centroid first); an image gets, for
 * that token, the value of the first list it appears in; values are summed over tokens.
 *
 *   offsets (C+1) int64, ids (postings) int32: list c is ids[offsets[c] .. offsets[c+1]);
 *   cap > 0 reads only a list's first cap postings (impact-ordered lists: its best ones).
 *   probes (T, P) int32 centroid ids, vals (T, P) float32 (already minus the token's fill).
 *   acc (N) float32 all zero on entry and on return; stamp (N) int32 marks: an image already
 *   scored for token t holds base + t; base + T <= INT32_MAX and every stamp < base on entry.
 *   Writes the touched images and their sums to out_ids / out_vals; returns how many.
 */
#include <stdint.h>

int64_t craterlab_list_score(const int64_t *offsets, const int32_t *ids, const int32_t *probes,
                             const float *vals, int64_t T, int64_t P, float *acc,
                             int32_t *stamp, int32_t base, int32_t *out_ids, float *out_vals,
                             int64_t cap) {
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
                const int32_t img = list[j];
                const int32_t s = stamp[img];
                if (s == mark) continue;           /* scored for this token by a better list */
                if (s < base) out_ids[n_out++] = img; /* first touch in this query */
                stamp[img] = mark;
                acc[img] += v;
            }
        }
    }
    for (int64_t j = 0; j < n_out; j++) {
        out_vals[j] = acc[out_ids[j]];
        acc[out_ids[j]] = 0.0f;
    }
    return n_out;
}
