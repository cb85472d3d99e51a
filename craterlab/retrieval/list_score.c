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
 * craterlab_top_s keeps the best S of them; craterlab_child_probe scores each query token
 * against the lists of its best coarse cells (two-level indexes, cell_probe).
 */
#include <stdint.h>

typedef struct {
    float acc;
    int32_t stamp;
} slot_t;

int64_t craterlab_list_score(const int64_t *offsets, const int32_t *ids, const int32_t *probes,
                             const float *vals, int64_t T, int64_t P, slot_t *slot, int32_t base,
                             int32_t *out_ids, float *out_vals, int64_t cap, int64_t block,
                             int64_t n, int64_t *cursor) {
    /* block > 0 (lists sorted by image, no cap): the images are visited block by block, each
     * probed list read from where the previous block left it (cursor, T*P), so the slots a
     * block touches stay in the core's cache however large the gallery; the result is the
     * same, since an image lies in one block and each token's lists are still read best
     * first within it. */
    int64_t n_out = 0;
    const int64_t step = (block > 0 && cap == 0) ? block : n;
    for (int64_t tp = 0; tp < T * P; tp++) cursor[tp] = offsets[probes[tp]];
    for (int64_t lo = 0; lo < n; lo += step) {
        const int64_t hi = lo + step;
        for (int64_t t = 0; t < T; t++) {
            const int32_t mark = base + (int32_t)t;
            for (int64_t p = 0; p < P; p++) {
                const int64_t tp = t * P + p;
                const int32_t c = probes[tp];
                const float v = vals[tp];
                int64_t end = offsets[c + 1];
                if (cap > 0 && end - offsets[c] > cap) end = offsets[c] + cap;
                int64_t j = cursor[tp];
                for (; j < end; j++) {
                    if (j + 12 < end) __builtin_prefetch(slot + ids[j + 12], 1); /* its slot */
                    const int32_t img = ids[j];
                    if (step != n && img >= hi) break;
                    slot_t *e = slot + img;
                    const int32_t s = e->stamp;
                    if (s == mark) continue;          /* scored for this token by a better list */
                    if (s < base) out_ids[n_out++] = img; /* first touch in this query */
                    e->stamp = mark;
                    e->acc += v;
                }
                cursor[tp] = j;
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

/* Exchange entries a and b of a heap's values and ids. */
static void swap_at(float *hv, int32_t *hi, int64_t a, int64_t b) {
    float tv = hv[a]; hv[a] = hv[b]; hv[b] = tv;
    int32_t ti = hi[a]; hi[a] = hi[b]; hi[b] = ti;
}

static void sift_down(float *hv, int32_t *hi, int64_t n, int64_t i) {
    for (;;) {
        int64_t w = i, l = 2 * i + 1, r = l + 1;
        if (l < n && worse(hv[l], hi[l], hv[w], hi[w])) w = l;
        if (r < n && worse(hv[r], hi[r], hv[w], hi[w])) w = r;
        if (w == i) return;
        swap_at(hv, hi, i, w);
        i = w;
    }
}

/* Offer (v, id) to a heap of at most k best, its worst at the root (n: its size). */
static void heap_offer(float *hv, int32_t *hi, int64_t *n, int64_t k, float v, int32_t id) {
    if (*n < k) {
        int64_t i = (*n)++;
        hv[i] = v;
        hi[i] = id;
        while (i > 0) { /* sift up */
            int64_t up = (i - 1) / 2;
            if (!worse(hv[i], hi[i], hv[up], hi[up])) break;
            swap_at(hv, hi, i, up);
            i = up;
        }
    } else if (k > 0 && worse(hv[0], hi[0], v, id)) {
        hv[0] = v;
        hi[0] = id;
        sift_down(hv, hi, *n, 0);
    }
}

/* Heap sort in place: the worst goes last, so the n entries end best first. */
static void heap_sort(float *hv, int32_t *hi, int64_t n) {
    for (int64_t m = n - 1; m > 0; m--) {
        swap_at(hv, hi, 0, m);
        sift_down(hv, hi, m, 0);
    }
}

/* The s best of m (image, value) pairs, best first (ties: lower image first), into
 * best_ids / best_vals (room for s); returns how many (min(s, m)): one comparison with the
 * heap's worst for most of the m pairs. */
int64_t craterlab_top_s(const int32_t *ids, const float *vals, int64_t m, int64_t s,
                        int32_t *best_ids, float *best_vals) {
    int64_t n = 0;
    for (int64_t j = 0; j < m; j++) heap_offer(best_vals, best_ids, &n, s, vals[j], ids[j]);
    heap_sort(best_vals, best_ids, n);
    return n;
}

/* One query token's inner product with one int8 centroid row (times its scale outside), 16
 * partial sums (vectorized without reassociating a single sum). */
static float dot(const float *a, const int8_t *b, int64_t d) {
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16)
        for (int k = 0; k < 16; k++) part[k] += a[i + k] * (float)b[i + k];
    float sum = 0.0f;
    for (; i < d; i++) sum += a[i] * (float)b[i];
    for (int k = 0; k < 16; k++) sum += part[k];
    return sum;
}

/* For each of T query tokens q (T, D): its k best lists among the children of its P cells
 * (cells (T, P); child j of cell c is centroid row c * per + j), best first (ties: lower
 * list first), into out_ids / out_vals (T, k); k <= P * per. The centroids are read in
 * place as int8 rows with one scale each (codes (C, D), scales (C)): a quarter of the
 * float rows' bytes, which is what this memory-bound loop costs on a large index. */
void craterlab_child_probe(const float *q, int64_t T, int64_t D, const int32_t *cells, int64_t P,
                           const int8_t *codes, const float *scales, int64_t per, int64_t k,
                           int32_t *out_ids, float *out_vals) {
    for (int64_t t = 0; t < T; t++) {
        int32_t *hi = out_ids + t * k;
        float *hv = out_vals + t * k;
        int64_t n = 0;
        for (int64_t p = 0; p < P; p++) {
            const int64_t first = (int64_t)cells[t * P + p] * per;
            for (int64_t j = 0; j < per; j++) {
                const int64_t row = first + j;
                const float v = scales[row] * dot(q + t * D, codes + row * D, D);
                heap_offer(hv, hi, &n, k, v, (int32_t)row);
            }
        }
        heap_sort(hv, hi, n);
    }
}
