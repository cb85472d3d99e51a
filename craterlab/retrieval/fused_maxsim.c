/* Fused late-interaction rerank for the CPU engine (craterlab/retrieval/fused.py builds and
 * loads this file; the reference is craterlab/retrieval/late_interaction.py).
 *
 * For queries a in [a0, a1) and their candidates s in [s0, s1) it computes, in one pass over
 * each candidate's rows and without any intermediate array in memory:
 *
 *   out[a, s] = sum_i w[a, i] * max_{j real} ( scale_j * <q_ai, g_cj> )      (c = cand[a, s])
 *
 * where w[a, i] = qscale[a, i] * qmask[a, i] / (real query tokens of a), i.e. the masked mean
 * over query tokens of the per-token maximum over the candidate's real tokens. The dot
 * products run on AVX-512 VNNI (int8 codes, vpdpbusd) or AVX-512 BF16 (vdpbf16ps), register-
 * blocked as 8 gallery rows x 32 query tokens (or x 16 for the last 16), with the query
 * operand packed once per query (fused.py) so that it stays in L1 for all S candidates.
 *
 * Conventions (the reference's): a candidate index < 0 scores -inf; a query with no real token
 * scores 0; a candidate with no real token scores -inf (where the query has a real token).
 *
 * int8: vpdpbusd multiplies unsigned by signed bytes, so the query is packed as unsigned
 * (q + 128, fused.py) and 128 times each gallery row's code sum is subtracted afterwards:
 * exact in int32 for D < 2^31 / (255 * 127).
 */
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROWS 8
/* While a candidate computes, the next one's rows are prefetched into L1, one line every other
 * step of the dot-product loop (a burst of prefetches at the start of each block, or fetching
 * two candidates ahead into L2, measured 8-10% slower on random candidates of a 614 MB store:
 * what remains is mostly TLB misses, 3 pages per candidate). */
#define PF_HINT _MM_HINT_T0

typedef struct {
    const void *g;         /* gallery rows (N, K, D): int8 or bf16 (uint16) */
    const float *gscale;   /* int8: (N, 1) per image or (N, K) per token; NULL for bf16 */
    int64_t scale_stride;  /* 1: one scale per image, K: one per token */
    const uint8_t *gmask;  /* (N, K) real tokens, or NULL */
    int64_t K, D;
    const void *qpack;     /* int8: (Nq, D/4, KQP, 4) q + 128 as bytes; bf16: (Nq, D/2, KQP, 2) */
    const int32_t *qcorr;  /* unused (NULL) */
    const float *qweight;  /* (Nq, KQP) */
    const int64_t *nreal;  /* (Nq,) real query tokens */
    int64_t KQP;           /* query tokens padded to a multiple of 16 */
    const int64_t *cand;   /* (Nq, S) */
    int64_t S;
    float *out;            /* (Nq, S) */
} Args;

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* ---------------------------------------------------------------- int8 (VNNI) */

/* The 8 rows x 32 columns block, its 16 accumulators named (GCC keeps an array of vectors
 * indexed in unrolled loops in registers only partly: it copied and spilled them on every
 * step of the D loop, a third of the kernel's time). g: 8 consecutive rows of D codes; bp: the
 * packed query columns, step bytes apart per group of 4 dimensions. */
#define I8_ROW(r)                                                                          \
    do {                                                                                   \
        const __m512i a = _mm512_set1_epi32(*(const int32_t *)(g + (r) * D + 4 * k));      \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, b0, a);                                      \
        c##r##1 = _mm512_dpbusd_epi32(c##r##1, b1, a);                                      \
    } while (0)

static inline __attribute__((always_inline)) void i8_dot_8x32(const int8_t *g, int64_t D,
                                                              int64_t D4, const uint8_t *bp,
                                                              int64_t step, const char *pf,
                                                              __m512i *out) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
            c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    for (int64_t k = 0; k < D4; k++, bp += step) {
        const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 64);
        /* one line of a later candidate's 8 rows every other step: 32 * D4 = 8 * D bytes */
        if (pf && !(k & 1)) _mm_prefetch(pf + 32 * k, PF_HINT);
        I8_ROW(0); I8_ROW(1); I8_ROW(2); I8_ROW(3);
        I8_ROW(4); I8_ROW(5); I8_ROW(6); I8_ROW(7);
    }
    out[0] = c00; out[1] = c01; out[2] = c10; out[3] = c11; out[4] = c20; out[5] = c21;
    out[6] = c30; out[7] = c31; out[8] = c40; out[9] = c41; out[10] = c50; out[11] = c51;
    out[12] = c60; out[13] = c61; out[14] = c70; out[15] = c71;
}

/* rows x (NV * 16) int32 dot products of gallery rows r0.. with query columns c0.. */
#define I8_BLOCK(NR, NV)                                                                   \
    do {                                                                                   \
        __m512i acc[NR][NV];                                                               \
        int32_t corr[NR];                                                                  \
        const int8_t *grow[NR];                                                            \
        for (int r = 0; r < NR; r++) {                                                     \
            grow[r] = gi + (r0 + r) * D;                                                   \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_si512();              \
            corr[r] = 128 * row_sum(grow[r], D);                                           \
        }                                                                                  \
        if (gnext && (NR != ROWS || NV != 2) && c0 == 0)                                   \
            prefetch_rows((const char *)(gnext + r0 * D), NR * D);                         \
        const uint8_t *bp = qp + c0 * 4;                                                   \
        if (NR == ROWS && NV == 2) {                                                       \
            i8_dot_8x32(grow[0], D, D4, bp, KQP * 4,                                       \
                        gnext && c0 == 0 ? (const char *)(gnext + r0 * D) : NULL, &acc[0][0]); \
        } else {                                                                           \
            for (int64_t k = 0; k < D4; k++, bp += KQP * 4) {                              \
                __m512i b[NV];                                                             \
                for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_si512(bp + v * 64);       \
                for (int r = 0; r < NR; r++) {                                             \
                    __m512i a = _mm512_set1_epi32(*(const int32_t *)(grow[r] + 4 * k));    \
                    for (int v = 0; v < NV; v++)                                           \
                        acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], b[v], a);               \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < NR; r++) {                                                     \
            if (gm && !gm[r0 + r]) continue;                                               \
            any = 1;                                                                       \
            __m512i cr = _mm512_set1_epi32(corr[r]);                                       \
            if (per_token) {                                                               \
                __m512 sc = _mm512_set1_ps(gs[r0 + r]);                                    \
                for (int v = 0; v < NV; v++) {                                             \
                    __m512i d = _mm512_sub_epi32(acc[r][v], cr);                           \
                    fmax[v] = _mm512_max_ps(fmax[v], _mm512_mul_ps(_mm512_cvtepi32_ps(d), sc)); \
                }                                                                          \
            } else {                                                                       \
                for (int v = 0; v < NV; v++)                                               \
                    imax[v] = _mm512_max_epi32(imax[v], _mm512_sub_epi32(acc[r][v], cr));  \
            }                                                                              \
        }                                                                                  \
    } while (0)

#define I8_COLUMNS(NV)                                                                     \
    do {                                                                                   \
        __m512i imax[NV];                                                                  \
        __m512 fmax[NV];                                                                   \
        for (int v = 0; v < NV; v++) {                                                     \
            imax[v] = _mm512_set1_epi32(INT32_MIN);                                        \
            fmax[v] = _mm512_set1_ps(-INFINITY);                                           \
        }                                                                                  \
        int64_t r0 = 0;                                                                    \
        for (; r0 + ROWS <= K; r0 += ROWS) I8_BLOCK(ROWS, NV);                             \
        for (; r0 < K; r0++) I8_BLOCK(1, NV);                                              \
        for (int v = 0; v < NV; v++) {                                                     \
            __m512 w = _mm512_loadu_ps(qw + c0 + v * 16);                                  \
            __m512 m = per_token ? fmax[v] : _mm512_cvtepi32_ps(imax[v]);                  \
            /* padded query columns have weight 0 and a finite max: no 0 * inf */          \
            total += hsum(_mm512_mul_ps(m, w));                                            \
        }                                                                                  \
    } while (0)

/* sum of a row's int8 codes (D % 4 == 0), for the unsigned-query correction */
static inline int32_t row_sum(const int8_t *row, int64_t D) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512();
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(row + d));
    int32_t total = _mm512_reduce_add_epi32(acc);
    for (; d < D; d++) total += row[d];
    return total;
}

/* a later candidate's rows (a block's worth) while this one computes */
static inline void prefetch_rows(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, PF_HINT);
}

/* the gallery item scored after (a, s) in this work item, -1 for none: the next candidate of
 * the query, else the first of the next query */
static inline int64_t next_candidate(const Args *p, int64_t a, int64_t s, int64_t a1, int64_t s0,
                                     int64_t s1) {
    if (s + 1 < s1) return p->cand[a * p->S + s + 1];
    return a + 1 < a1 ? p->cand[(a + 1) * p->S + s0] : -1;
}

void craterlab_rerank_i8(const Args *p, int64_t a0, int64_t a1, int64_t s0, int64_t s1) {
    const int64_t K = p->K, D = p->D, D4 = p->D / 4, KQP = p->KQP;
    const int per_token = p->scale_stride != 1;
    for (int64_t a = a0; a < a1; a++) {
        const uint8_t *qp = (const uint8_t *)p->qpack + a * D4 * KQP * 4;
        const float *qw = p->qweight + a * KQP;
        for (int64_t s = s0; s < s1; s++) {
            const int64_t c = p->cand[a * p->S + s];
            float *o = p->out + a * p->S + s;
            if (c < 0) { *o = -INFINITY; continue; }
            if (p->nreal[a] == 0) { *o = 0.0f; continue; }
            const int8_t *gi = (const int8_t *)p->g + c * K * D;
            const uint8_t *gm = p->gmask ? p->gmask + c * K : NULL;
            const float *gs = p->gscale + c * p->scale_stride;
            const int64_t cn = next_candidate(p, a, s, a1, s0, s1);
            const int8_t *gnext = cn >= 0 ? (const int8_t *)p->g + cn * K * D : NULL;
            int any = 0;
            float total = 0.0f;
            int64_t c0 = 0;
            for (; c0 + 32 <= KQP; c0 += 32) I8_COLUMNS(2);
            for (; c0 < KQP; c0 += 16) I8_COLUMNS(1);
            *o = !any ? -INFINITY : per_token ? total : total * gs[0];
        }
    }
}

/* ---------------------------------------------------------------- bf16 (AVX-512 BF16) */

#define BF_BLOCK(NR, NV)                                                                   \
    do {                                                                                   \
        __m512 acc[NR][NV];                                                                \
        for (int r = 0; r < NR; r++)                                                       \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();                 \
        const int32_t *grow[NR];                                                           \
        for (int r = 0; r < NR; r++) grow[r] = (const int32_t *)(gi + (r0 + r) * D);        \
        /* the next candidate's rows: NR == ROWS spreads 32 * D2 = 16 * D bytes over the loop */ \
        const char *pf = gnext && c0 == 0 ? (const char *)(gnext + r0 * D) : NULL;         \
        if (pf && NR != ROWS) prefetch_rows(pf, 2 * NR * D);                               \
        const uint16_t *bp = qp + c0 * 2;                                                  \
        for (int64_t k = 0; k < D2; k++, bp += KQP * 2) {                                  \
            __m512bh b[NV];                                                                \
            for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(bp + v * 32); \
            if (NR == ROWS && pf && !(k & 1)) _mm_prefetch(pf + 32 * k, PF_HINT);          \
            for (int r = 0; r < NR; r++) {                                                 \
                __m512bh a = (__m512bh)_mm512_set1_epi32(grow[r][k]);                      \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]); \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < NR; r++) {                                                     \
            if (gm && !gm[r0 + r]) continue;                                               \
            any = 1;                                                                       \
            for (int v = 0; v < NV; v++) fmax[v] = _mm512_max_ps(fmax[v], acc[r][v]);     \
        }                                                                                  \
    } while (0)

#define BF_COLUMNS(NV)                                                                     \
    do {                                                                                   \
        __m512 fmax[NV];                                                                   \
        for (int v = 0; v < NV; v++) fmax[v] = _mm512_set1_ps(-INFINITY);                  \
        int64_t r0 = 0;                                                                    \
        for (; r0 + ROWS <= K; r0 += ROWS) BF_BLOCK(ROWS, NV);                             \
        for (; r0 < K; r0++) BF_BLOCK(1, NV);                                              \
        for (int v = 0; v < NV; v++)                                                       \
            total += hsum(_mm512_mul_ps(fmax[v], _mm512_loadu_ps(qw + c0 + v * 16)));     \
    } while (0)

void craterlab_rerank_bf16(const Args *p, int64_t a0, int64_t a1, int64_t s0, int64_t s1) {
    const int64_t K = p->K, D = p->D, D2 = p->D / 2, KQP = p->KQP;
    for (int64_t a = a0; a < a1; a++) {
        const uint16_t *qp = (const uint16_t *)p->qpack + a * D2 * KQP * 2;
        const float *qw = p->qweight + a * KQP;
        for (int64_t s = s0; s < s1; s++) {
            const int64_t c = p->cand[a * p->S + s];
            float *o = p->out + a * p->S + s;
            if (c < 0) { *o = -INFINITY; continue; }
            if (p->nreal[a] == 0) { *o = 0.0f; continue; }
            const uint16_t *gi = (const uint16_t *)p->g + c * K * D;
            const uint8_t *gm = p->gmask ? p->gmask + c * K : NULL;
            const int64_t cn = next_candidate(p, a, s, a1, s0, s1);
            const uint16_t *gnext = cn >= 0 ? (const uint16_t *)p->g + cn * K * D : NULL;
            int any = 0;
            float total = 0.0f;
            int64_t c0 = 0;
            for (; c0 + 32 <= KQP; c0 += 32) BF_COLUMNS(2);
            for (; c0 < KQP; c0 += 16) BF_COLUMNS(1);
            *o = any ? total : -INFINITY;
        }
    }
}

/* 1 when this file was compiled for the instructions it uses (checked before any call). */
int craterlab_fused_abi(void) { return 1; }

/* ---------------------------------------------------------------- query packing */

/* max |x[d]| over D floats, NaN ignored (as fmaxf does: the max keeps its second operand) */
static inline float abs_max(const float *x, int64_t D) {
    __m512 m = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + d)), m);
    float r = _mm512_reduce_max_ps(m);
    for (; d < D; d++) r = fmaxf(r, fabsf(x[d]));
    return r;
}

/* 16 dimensions of one query token -> 4 groups of 4 codes + 128, each group step bytes after
 * the last: round-half-even(x / scale) clamped to +-127, the division exact as in the
 * scalar loop (and in quantizers.quantize_int8), so the codes are identical */
static inline void pack_i8_16(const float *x, float scale, uint8_t *out, int64_t step) {
    __m512 c = _mm512_div_ps(_mm512_loadu_ps(x), _mm512_set1_ps(scale));
    c = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    c = _mm512_min_ps(_mm512_max_ps(c, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(c), _mm512_set1_epi32(128));
    uint32_t words[4];
    _mm_storeu_si128((__m128i *)words, _mm512_cvtepi32_epi8(v));
    for (int j = 0; j < 4; j++) memcpy(out + j * step, &words[j], 4);
}

/* Query tokens q (Nq, Kq, D) float32 -> the kernels' operand, in one pass (no torch ops per
 * call): qweight (Nq, KQP) = scale_i * real_i / (real tokens), 0 for padding columns; nreal.
 * int8 (bf16 == 0): per-token symmetric codes exactly as quantizers.quantize_int8 makes them
 * (s = max|x| / 127, code = round-half-even(x / s) clamped to +-127, s clamped to the least
 * normal float), packed as code + 128 into (Nq, D/4, KQP, 4); padding columns hold 128 (code 0).
 * bf16: round-to-nearest-even bf16 into (Nq, D/2, KQP, 2); padding columns hold 0. */
void craterlab_pack_queries(const float *q, const uint8_t *mask, int64_t nq, int64_t kq,
                            int64_t D, int64_t KQP, int bf16, void *qpack, float *qweight,
                            int64_t *nreal) {
    const int64_t G = bf16 ? 2 : 4, DG = D / G;
    for (int64_t a = 0; a < nq; a++) {
        int64_t n = 0;
        for (int64_t i = 0; i < kq; i++) n += mask ? mask[a * kq + i] != 0 : 1;
        nreal[a] = n;
        const float inv = 1.0f / (float)(n > 0 ? n : 1);
        for (int64_t i = 0; i < KQP; i++) {
            const float *x = q + (a * kq + (i < kq ? i : 0)) * D;
            const int real = i < kq && (!mask || mask[a * kq + i]);
            float scale = 1.0f;
            if (!bf16) {
                float m = 0.0f;
                if (i < kq) m = abs_max(x, D);
                scale = m / 127.0f;
            }
            if (bf16) {
                uint16_t *out = (uint16_t *)qpack + a * DG * KQP * 2;
                for (int64_t d = 0; d < D; d++) {
                    uint16_t h = 0;
                    if (i < kq) {
                        uint32_t bits;
                        memcpy(&bits, &x[d], 4);
                        h = (bits & 0x7fffffffu) > 0x7f800000u
                                ? (uint16_t)((bits >> 16) | 0x40)
                                : (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
                    }
                    out[((d / 2) * KQP + i) * 2 + d % 2] = h;
                }
                qweight[a * KQP + i] = real ? inv : 0.0f;
            } else {
                uint8_t *out = (uint8_t *)qpack + a * DG * KQP * 4;
                const float safe = scale > 0.0f ? scale : 1.0f;
                int64_t d = 0;
                if (i < kq)
                    for (; d + 16 <= D; d += 16) pack_i8_16(x + d, safe, out + ((d / 4) * KQP + i) * 4, KQP * 4);
                for (; d < D; d++) {
                    float c = 0.0f;
                    if (i < kq) c = fminf(fmaxf(nearbyintf(x[d] / safe), -127.0f), 127.0f);
                    out[((d / 4) * KQP + i) * 4 + d % 4] = (uint8_t)((int)c + 128);
                }
                const float s = scale > FLT_MIN ? scale : FLT_MIN;
                qweight[a * KQP + i] = real ? inv * s : 0.0f;
            }
        }
    }
}
