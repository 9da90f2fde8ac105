/* gradlab's probe reductions: per-sample sums over activations, one pass each.
 *
 * Built once per machine by gradlab.probing.fused with the system C compiler and loaded with
 * ctypes. Every kernel reads n samples of `per` contiguous elements (sample i is the range
 * [i*per, (i+1)*per): an NCHW- or channels_last-contiguous tensor) and writes K double sums per
 * sample to out[i*ld + k] (ld >= K: a slice of the probe's per-step table of sums). Two
 * element types: float32 (suffix _f32) and bfloat16 (_bf16, widened to float exactly in
 * registers by a shift or a mask, so no float32 copy of the tensor is ever made).
 *
 * Accuracy: products are formed in float (exact for bf16 inputs, rounded once for float32) and
 * summed in float SIMD lanes over chunks of CHUNK iterations (at most CHUNK + 1 terms per lane),
 * then the chunks are added in double. The relative error of a sum of squares is about 1e-7 whatever
 * the tensor size, so differences of sums (the probe's <F, s> = <F, t> - ||F||^2) stay
 * accurate.
 *
 * Portable C with GCC/Clang vector extensions: the compiler maps them onto whatever SIMD the
 * machine has (AVX-512, AVX2, NEON). OpenMP splits the samples across threads when it is enabled
 * at build time; without it the kernels run on one thread.
 */
#include <stdint.h>
#include <string.h>

#define W 16       /* floats per vector */
#define CHUNK 16   /* iterations summed in float before a chunk is added in double */

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef double vd __attribute__((vector_size(W * 8)));

enum { SQ, PAIR, GAP, ADDRELU };

/* 2*W elements from element k as two float vectors. bf16: one load of 2*W halves read as W
 * words; each word holds two bf16 values, whose floats are (word << 16) and (word & 0xffff0000).
 * No widening shuffle is needed, and since every kernel is elementwise in its operands (both
 * split the same way) and only sums the terms, the order of the elements does not matter. */
static inline void vload2(const void *p, int64_t k, int bf, vf *x0, vf *x1) {
    if (bf) {
        vu u, lo, hi;
        memcpy(&u, (const uint16_t *)p + k, sizeof u);
        lo = u << 16;
        hi = u & 0xffff0000u;
        memcpy(x0, &lo, sizeof *x0);
        memcpy(x1, &hi, sizeof *x1);
    } else {
        memcpy(x0, (const float *)p + k, sizeof *x0);
        memcpy(x1, (const float *)p + k + W, sizeof *x1);
    }
}

static inline double sload(const void *p, int64_t k, int bf) {
    if (bf) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[k] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return ((const float *)p)[k];
}

static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* The per-element terms of each kernel, vector form: acc[k] += term_k(a, b). */
static inline void vterms(int kind, vf a, vf b, vf *acc) {
    switch (kind) {
    case SQ:       /* ||a||^2 */
        acc[0] += a * a;
        break;
    case PAIR: {   /* ||f||^2, ||s||^2, <f, s>, ||max(f, -s)||^2 = ||relu(f + s) - s||^2 */
        vf d = vselect(a > -b, a, -b);
        acc[0] += a * a; acc[1] += b * b; acc[2] += a * b; acc[3] += d * d;
        break;
    }
    case GAP: {    /* ||h - x||^2, ||x||^2 */
        vf d = a - b;
        acc[0] += d * d; acc[1] += b * b;
        break;
    }
    case ADDRELU: { /* ||f||^2, <f, t>, ||relu(t)||^2, ||f - min(t, 0)||^2 */
        /* relu by the sign bit (no compare); d = a - (b - h) is a where t > 0, exactly. */
        vi bits = (vi)b;
        vf h = (vf)(bits & ~(bits >> 31)), d = a - (b - h);
        acc[0] += a * a; acc[1] += a * b; acc[2] += h * h; acc[3] += d * d;
        break;
    }
    }
}

/* The same terms for the tail elements, in double. */
static inline void sterms(int kind, double a, double b, double *s) {
    switch (kind) {
    case SQ:
        s[0] += a * a;
        break;
    case PAIR: {
        double d = a > -b ? a : -b;
        s[0] += a * a; s[1] += b * b; s[2] += a * b; s[3] += d * d;
        break;
    }
    case GAP: {
        double d = a - b;
        s[0] += d * d; s[1] += b * b;
        break;
    }
    case ADDRELU: {
        double h = b > 0 ? b : 0, d = a - (b < 0 ? b : 0);
        s[0] += a * a; s[1] += a * b; s[2] += h * h; s[3] += d * d;
        break;
    }
    }
}

/* The second operand's 2*W elements (unused by SQ, whose b may be NULL). */
static inline void second2(int kind, const void *b, int64_t k, int bf, vf *x0, vf *x1) {
    if (kind == SQ) {
        const vf zero = {0};
        *x0 = zero;
        *x1 = zero;
    } else {
        vload2(b, k, bf, x0, x1);
    }
}

static inline int nsums(int kind) { return kind == SQ ? 1 : kind == GAP ? 2 : 4; }

/* The K sums of one sample: `per` elements from offset o, written to row[0..K). */
static inline __attribute__((always_inline)) void
sample(int kind, int bf, const void *a, const void *b, int64_t o, int64_t per, double *row) {
    const int K = nsums(kind);
    /* R independent accumulator vectors per sum hide the FMA latency: 4 for the kernels of
     * one or two sums, 2 (8 chains) for those of four. One iteration reads R*W elements. */
    enum { R = 4 };
    const int r = K == 4 ? 2 : R;
    vd total[4] = {{0}, {0}, {0}, {0}};
    int64_t j = 0;
    while (j + 2 * W <= per) {
        vf acc[R][4] = {{{0}}};
        for (int q = 0; q < CHUNK && j + r * W <= per; q++, j += r * W)
            for (int v = 0; v < r; v += 2) {
                vf a0, a1, b0, b1;
                vload2(a, o + j + v * W, bf, &a0, &a1);
                second2(kind, b, o + j + v * W, bf, &b0, &b1);
                vterms(kind, a0, b0, acc[v]);
                vterms(kind, a1, b1, acc[v + 1]);
            }
        if (j + r * W > per) /* fewer than R*W left: 2*W at a time */
            for (; j + 2 * W <= per; j += 2 * W) {
                vf a0, a1, b0, b1;
                vload2(a, o + j, bf, &a0, &a1);
                second2(kind, b, o + j, bf, &b0, &b1);
                vterms(kind, a0, b0, acc[0]);
                vterms(kind, a1, b1, acc[1]);
            }
        for (int k = 0; k < K; k++) {
            vf sum = acc[0][k];
            for (int v = 1; v < r; v++) sum += acc[v][k];
            total[k] += __builtin_convertvector(sum, vd);
        }
    }
    double s[4] = {0, 0, 0, 0};
    for (; j < per; j++)
        sterms(kind, sload(a, o + j, bf), kind == SQ ? 0 : sload(b, o + j, bf), s);
    for (int k = 0; k < K; k++) {
        double t = s[k];
        for (int l = 0; l < W; l++) t += total[k][l];
        row[k] = t;
    }
}

/* OpenMP outlines a parallel region before inlining, into one function that would take `kind`
 * and `bf` as run-time values (a branch per element, several times slower). So every exported
 * kernel has a region of its own, in which sample() is specialized for its constants. */
#ifdef _OPENMP
#define SAMPLES_PARALLEL \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (n > 1 && n * per >= 32768)")
#else
#define SAMPLES_PARALLEL
#endif

#define EXPORT_ONE(NAME, KIND, SUFFIX, BF)                                                  \
    void gl_##NAME##_##SUFFIX(const void *a, const void *b, int64_t n, int64_t per,          \
                              double *out, int64_t ld, int threads) {                         \
        (void)threads; /* used by OpenMP builds only */                                       \
        SAMPLES_PARALLEL                                                                      \
        for (int64_t i = 0; i < n; i++)                                                       \
            sample(KIND, BF, a, b, i * per, per, out + i * ld);                               \
    }
#define EXPORT(NAME, KIND) EXPORT_ONE(NAME, KIND, f32, 0) EXPORT_ONE(NAME, KIND, bf16, 1)

EXPORT(sq, SQ)
EXPORT(pair, PAIR)
EXPORT(gap, GAP)
EXPORT(addrelu, ADDRELU)

/* ||t_i||^2 of `count` dense tensors at once (a model's parameters or their gradients): the
 * tensors are spread over the threads, each summed like one sample of gl_sq. */
#define EXPORT_LIST(SUFFIX, BF)                                                              \
    void gl_sqlist_##SUFFIX(const void *const *ptrs, const int64_t *sizes, int64_t count,    \
                            double *out, int threads) {                                      \
        (void)threads; /* used by OpenMP builds only */                                      \
        SQLIST_PARALLEL                                                                      \
        for (int64_t i = 0; i < count; i++)                                                  \
            sample(SQ, BF, ptrs[i], 0, 0, sizes[i], out + i);                                 \
    }

#ifdef _OPENMP
#define SQLIST_PARALLEL _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")
#else
#define SQLIST_PARALLEL
#endif

EXPORT_LIST(f32, 0)
EXPORT_LIST(bf16, 1)
