/* gradlab's probe reductions: per-sample sums over activations, one pass each.
 *
 * Built once per machine by gradlab.probing.fused with the system C compiler and loaded with
 * ctypes. Every kernel reads n samples of `per` contiguous elements (sample i is the range
 * [i*per, (i+1)*per): an NCHW- or channels_last-contiguous tensor) and writes K double sums per
 * sample to out[i*ld + k] (ld >= K: a slice of the probe's per-step table of sums). Two
 * element types: float32 (suffix _f32) and bfloat16 (_bf16, widened to float exactly by a
 * 16-bit shift, so no float32 copy of the tensor is ever made).
 *
 * Accuracy: products are formed in float (exact for bf16 inputs, rounded once for float32) and
 * summed in float SIMD lanes over chunks of CHUNK vectors (at most 2*CHUNK terms per lane), then
 * the chunks are added in double. The relative error of a sum of squares is about 1e-7 whatever
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
#define CHUNK 16   /* vector pairs summed in float before a chunk is added in double */

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef double vd __attribute__((vector_size(W * 8)));

enum { SQ, PAIR, GAP, ADDRELU };

static inline vf vload(const void *p, int64_t k, int bf) {
    vf r;
    if (bf) {
        vh h;
        memcpy(&h, (const uint16_t *)p + k, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(&r, &u, sizeof r);
    } else {
        memcpy(&r, (const float *)p + k, sizeof r);
    }
    return r;
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
    const vf zero = {0};
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
        vf h = vselect(b > zero, b, zero), d = a - vselect(b < zero, b, zero);
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

/* The second operand (unused by SQ, whose b may be NULL). */
static inline vf second(int kind, const void *b, int64_t k, int bf) {
    const vf zero = {0};
    return kind == SQ ? zero : vload(b, k, bf);
}

static inline int nsums(int kind) { return kind == SQ ? 1 : kind == GAP ? 2 : 4; }

static inline __attribute__((always_inline)) void
reduce(int kind, int bf, const void *a, const void *b, int64_t n, int64_t per, double *out,
       int64_t ld, int threads) {
    const int K = nsums(kind);
    (void)threads; /* used by OpenMP builds only */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (n > 1 && n * per >= 32768)
#endif
    for (int64_t i = 0; i < n; i++) {
        const int64_t o = i * per;
        vd total[4] = {{0}, {0}, {0}, {0}};
        int64_t j = 0;
        while (j + W <= per) {
            /* Two independent accumulator sets hide the add latency. */
            vf acc0[4] = {{0}, {0}, {0}, {0}}, acc1[4] = {{0}, {0}, {0}, {0}};
            for (int q = 0; q < CHUNK && j + 2 * W <= per; q++, j += 2 * W) {
                vterms(kind, vload(a, o + j, bf), second(kind, b, o + j, bf), acc0);
                vterms(kind, vload(a, o + j + W, bf), second(kind, b, o + j + W, bf), acc1);
            }
            if (j + 2 * W > per && j + W <= per) {
                vterms(kind, vload(a, o + j, bf), second(kind, b, o + j, bf), acc0);
                j += W;
            }
            for (int k = 0; k < K; k++) total[k] += __builtin_convertvector(acc0[k] + acc1[k], vd);
        }
        double s[4] = {0, 0, 0, 0};
        for (; j < per; j++)
            sterms(kind, sload(a, o + j, bf), kind == SQ ? 0 : sload(b, o + j, bf), s);
        for (int k = 0; k < K; k++) {
            double t = s[k];
            for (int l = 0; l < W; l++) t += total[k][l];
            out[i * ld + k] = t;
        }
    }
}

#define EXPORT(NAME, KIND)                                                                  \
    void gl_##NAME##_f32(const void *a, const void *b, int64_t n, int64_t per, double *out,\
                         int64_t ld, int threads) {                                         \
        reduce(KIND, 0, a, b, n, per, out, ld, threads);                                    \
    }                                                                                       \
    void gl_##NAME##_bf16(const void *a, const void *b, int64_t n, int64_t per, double *out,\
                          int64_t ld, int threads) {                                        \
        reduce(KIND, 1, a, b, n, per, out, ld, threads);                                    \
    }

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
            reduce(SQ, BF, ptrs[i], 0, 1, sizes[i], out + i, 1, 1);                          \
    }

#ifdef _OPENMP
#define SQLIST_PARALLEL _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")
#else
#define SQLIST_PARALLEL
#endif

EXPORT_LIST(f32, 0)
EXPORT_LIST(bf16, 1)
