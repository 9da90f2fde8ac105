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
 *
 * Built with -DGL_PYTHON (where Python's headers are found), the library is also a Python
 * extension module whose one function, run(), takes tensors as DLPack capsules and checks their
 * layout itself: the probe's hooks then make two C calls per kernel instead of a dozen tensor
 * attribute reads and a ctypes call, which matters because hooks run mid-step, when every
 * Python-level call is slow (the interpreter's code and data are out of the caches). Its
 * grad_sq() is the probe's whole gradient hook in C: called by autograd for each response
 * gradient of a logged step, it runs no Python code at all in the common case.
 */
#ifdef GL_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <stdint.h>
#include <string.h>

#define W 16       /* floats per vector */
#define CHUNK 16   /* iterations summed in float before a chunk is added in double */

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef double vd __attribute__((vector_size(W * 8)));

/* The reading kernels, then those that also write a tensor: ADDRELU_OUT and RELUGRAD, and the
 * same two without sums (ADDRELU_ONLY, RELUGRAD_ONLY: the training loop's fused add + ReLU). */
enum { SQ, PAIR, GAP, ADDRELU, ADDRELU_OUT, RELUGRAD, ADDRELU_ONLY, RELUGRAD_ONLY };

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

/* Store two float vectors as vload2 reads them: bf16 values are taken from the high halves of
 * their floats (exact for values already rounded to bf16 by vround). */
static inline void vstore2(void *p, int64_t k, int bf, vf x0, vf x1) {
    if (bf) {
        vu u = ((vu)x1 & 0xffff0000u) | ((vu)x0 >> 16);
        memcpy((uint16_t *)p + k, &u, sizeof u);
    } else {
        memcpy((float *)p + k, &x0, sizeof x0);
        memcpy((float *)p + k + W, &x1, sizeof x1);
    }
}

/* float -> bf16 as ATen's vectorized CPU kernels round (to nearest even; every NaN becomes
 * 0xffff, where ATen's scalar loops keep other NaN bits: NaN payloads may differ, no value
 * does), kept as the float it stands for (low half zero). For float32 tensors, x itself. */
static inline vf vround(int bf, vf x) {
    if (!bf) return x;
    vu u = (vu)x;
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    vu nan = (vu)(x != x);
    return (vf)((r & ~nan) | (0xffff0000u & nan));
}

static inline float sround(int bf, float x) {
    if (!bf) return x;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = x != x ? 0xffff0000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}

static inline void sstore(void *p, int64_t k, int bf, float x) {
    if (bf) {
        uint32_t u;
        memcpy(&u, &x, sizeof u);
        ((uint16_t *)p)[k] = (uint16_t)(u >> 16);
    } else {
        ((float *)p)[k] = x;
    }
}

/* torch.relu on CPU: max(0, t) keeping t unless 0 > t (so -0 and NaN pass unchanged). */
static inline vf vrelu(vf t) {
    const vf zero = {0};
    return vselect(t < zero, zero, t);
}

/* ReLU's gradient as torch's threshold_backward(g, out, 0): 0 where out <= 0, else g. */
static inline vf vrelugrad(vf g, vf out) {
    const vf zero = {0};
    return vselect(out <= zero, zero, g);
}


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

/* The kernels that write a tensor as well, 2*W elements from element k: ADDRELU_OUT writes
 * dst = relu(a + b) (a + b rounded to the tensors' type first, as ATen's add does) and takes
 * addrelu's sums with f = a, t = a + b; RELUGRAD writes dst = threshold_backward(a, b, 0) and
 * takes its ||dst||^2; the _ONLY kinds write the same and take no sums. The values written are
 * ATen's to the bit (checked by the tests). */
static inline int adds(int kind) { return kind == ADDRELU_OUT || kind == ADDRELU_ONLY; }

static inline void vwrite(int kind, int bf, vf a0, vf a1, vf b0, vf b1, void *dst, int64_t k,
                          vf *acc0, vf *acc1) {
    if (adds(kind)) {
        vf t0 = vround(bf, a0 + b0), t1 = vround(bf, a1 + b1);
        vstore2(dst, k, bf, vrelu(t0), vrelu(t1));
        if (kind == ADDRELU_OUT) {
            vterms(ADDRELU, a0, t0, acc0);
            vterms(ADDRELU, a1, t1, acc1);
        }
    } else {
        vf g0 = vround(bf, vrelugrad(a0, b0)), g1 = vround(bf, vrelugrad(a1, b1));
        vstore2(dst, k, bf, g0, g1);
        if (kind == RELUGRAD) {
            vterms(SQ, g0, g0, acc0);
            vterms(SQ, g1, g1, acc1);
        }
    }
}

static inline void swrite(int kind, int bf, float a, float b, void *dst, int64_t k, double *s) {
    if (adds(kind)) {
        float t = sround(bf, a + b);
        sstore(dst, k, bf, t < 0 ? 0.0f : t);
        if (kind == ADDRELU_OUT) sterms(ADDRELU, a, t, s);
    } else {
        float g = sround(bf, b <= 0 ? 0.0f : a);
        sstore(dst, k, bf, g);
        if (kind == RELUGRAD) sterms(SQ, g, 0, s);
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

static inline int nsums(int kind) {
    return kind == SQ || kind == RELUGRAD ? 1 : kind == GAP ? 2 : kind >= ADDRELU_ONLY ? 0 : 4;
}

/* The K sums of one sample: `per` elements from offset o, written to row[0..K) (and for the
 * kernels that write a tensor, its elements o.. to dst). */
static inline __attribute__((always_inline)) void
sample(int kind, int bf, const void *a, const void *b, void *dst, int64_t o, int64_t per,
       double *row) {
    const int writes = kind >= ADDRELU_OUT;
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
                if (writes) {
                    vwrite(kind, bf, a0, a1, b0, b1, dst, o + j + v * W, acc[v], acc[v + 1]);
                } else {
                    vterms(kind, a0, b0, acc[v]);
                    vterms(kind, a1, b1, acc[v + 1]);
                }
            }
        if (j + r * W > per) /* fewer than R*W left: 2*W at a time */
            for (; j + 2 * W <= per; j += 2 * W) {
                vf a0, a1, b0, b1;
                vload2(a, o + j, bf, &a0, &a1);
                second2(kind, b, o + j, bf, &b0, &b1);
                if (writes) {
                    vwrite(kind, bf, a0, a1, b0, b1, dst, o + j, acc[0], acc[1]);
                } else {
                    vterms(kind, a0, b0, acc[0]);
                    vterms(kind, a1, b1, acc[1]);
                }
            }
        for (int k = 0; k < K; k++) {
            vf sum = acc[0][k];
            for (int v = 1; v < r; v++) sum += acc[v][k];
            total[k] += __builtin_convertvector(sum, vd);
        }
    }
    double s[4] = {0, 0, 0, 0};
    for (; j < per; j++)
        if (writes)
            swrite(kind, bf, (float)sload(a, o + j, bf), (float)sload(b, o + j, bf), dst, o + j, s);
        else
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
            sample(KIND, BF, a, b, 0, i * per, per, out + i * ld);                            \
    }
#define EXPORT(NAME, KIND) EXPORT_ONE(NAME, KIND, f32, 0) EXPORT_ONE(NAME, KIND, bf16, 1)

/* The kernels that also write dst (a tensor of a's layout): dst's sample i from a's and b's. */
#define EXPORT_OUT_ONE(NAME, KIND, SUFFIX, BF)                                              \
    void gl_##NAME##_##SUFFIX(const void *a, const void *b, void *dst, int64_t n,            \
                              int64_t per, double *out, int64_t ld, int threads) {            \
        (void)threads; /* used by OpenMP builds only */                                       \
        SAMPLES_PARALLEL                                                                      \
        for (int64_t i = 0; i < n; i++)                                                       \
            sample(KIND, BF, a, b, dst, i * per, per, out ? out + i * ld : 0);                \
    }
#define EXPORT_OUT(NAME, KIND) \
    EXPORT_OUT_ONE(NAME, KIND, f32, 0) EXPORT_OUT_ONE(NAME, KIND, bf16, 1)

EXPORT(sq, SQ)
EXPORT(pair, PAIR)
EXPORT(gap, GAP)
EXPORT(addrelu, ADDRELU)
EXPORT_OUT(addrelu_out, ADDRELU_OUT)
EXPORT_OUT(relugrad, RELUGRAD)
EXPORT_OUT(addrelu_only, ADDRELU_ONLY)
EXPORT_OUT(relugrad_only, RELUGRAD_ONLY)

/* ||t_i||^2 of `count` dense tensors at once (a model's parameters or their gradients): the
 * tensors are spread over the threads, each summed like one sample of gl_sq. */
#define EXPORT_LIST(SUFFIX, BF)                                                              \
    void gl_sqlist_##SUFFIX(const void *const *ptrs, const int64_t *sizes, int64_t count,    \
                            double *out, int threads) {                                      \
        (void)threads; /* used by OpenMP builds only */                                      \
        SQLIST_PARALLEL                                                                      \
        for (int64_t i = 0; i < count; i++)                                                  \
            sample(SQ, BF, ptrs[i], 0, 0, 0, sizes[i], out + i);                                 \
    }

#ifdef _OPENMP
#define SQLIST_PARALLEL _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")
#else
#define SQLIST_PARALLEL
#endif

EXPORT_LIST(f32, 0)
EXPORT_LIST(bf16, 1)

#ifdef GL_PYTHON
/* DLPack's ABI (dlpack.h, unversioned DLManagedTensor, stable since v0.2). */
typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape, *strides; /* strides NULL: compact row-major */
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *);
} DLManagedTensor;
enum { DL_CPU = 1, DL_FLOAT = 2, DL_BFLOAT = 4, MAX_DIMS = 16 };

typedef void (*kernel_fn)(const void *, const void *, int64_t, int64_t, double *, int64_t, int);
/* [kind][bf16]; kind as in the enum above, the order of gradlab.probing.fused.KERNELS. */
static const kernel_fn KERNEL_FNS[4][2] = {{gl_sq_f32, gl_sq_bf16}, {gl_pair_f32, gl_pair_bf16},
                                           {gl_gap_f32, gl_gap_bf16},
                                           {gl_addrelu_f32, gl_addrelu_bf16}};

static const DLTensor *unwrap(PyObject *capsule) {
    if (!PyCapsule_IsValid(capsule, "dltensor")) return NULL;
    return &((DLManagedTensor *)PyCapsule_GetPointer(capsule, "dltensor"))->dl_tensor;
}

/* Elements per sample when t is a non-empty float32/bf16 CPU tensor with memory behind it
 * whose samples (dim 0; a 1-d tensor is one sample) are dense, equally spaced ranges: the other
 * dims, in order of their strides, step through a sample's range with no gap or overlap (NCHW,
 * channels_last or any other permutation; the sums do not depend on the order). Else 0. */
static int64_t dense_per_sample(const DLTensor *t, int64_t *n, int *bf) {
    if (t->device.device_type != DL_CPU || t->data == NULL || t->ndim < 1 ||
        t->ndim > MAX_DIMS || t->dtype.lanes != 1)
        return 0;
    if (t->dtype.code == DL_FLOAT && t->dtype.bits == 32)
        *bf = 0;
    else if (t->dtype.code == DL_BFLOAT && t->dtype.bits == 16)
        *bf = 1;
    else
        return 0;
    int64_t numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] <= 0) return 0;
        numel *= t->shape[i];
    }
    *n = t->ndim > 1 ? t->shape[0] : 1;
    const int64_t per = numel / *n;
    if (t->strides == NULL) return per;
    int dims[MAX_DIMS], m = 0;
    for (int i = t->ndim > 1 ? 1 : 0; i < t->ndim; i++)
        if (t->shape[i] != 1) dims[m++] = i; /* a size-1 dim's stride says nothing */
    for (int i = 1; i < m; i++) /* insertion sort by stride */
        for (int j = i; j > 0 && t->strides[dims[j]] < t->strides[dims[j - 1]]; j--) {
            int d = dims[j];
            dims[j] = dims[j - 1];
            dims[j - 1] = d;
        }
    int64_t expect = 1;
    for (int i = 0; i < m; i++) {
        if (t->strides[dims[i]] != expect) return 0;
        expect *= t->shape[dims[i]];
    }
    if (t->ndim > 1 && *n > 1 && t->strides[0] != per) return 0;
    return per;
}

static int64_t stride_of(const DLTensor *t, int i) {
    if (t->strides) return t->strides[i];
    int64_t s = 1; /* compact row-major */
    for (int j = i + 1; j < t->ndim; j++) s *= t->shape[j];
    return s;
}

/* Whether b has a's dtype, shape and strides (element k of a sample is element k of the other). */
static int same_layout(const DLTensor *a, const DLTensor *b) {
    if (b->device.device_type != DL_CPU || b->data == NULL || b->ndim != a->ndim ||
        b->dtype.code != a->dtype.code || b->dtype.bits != a->dtype.bits || b->dtype.lanes != 1)
        return 0;
    for (int i = 0; i < a->ndim; i++)
        if (b->shape[i] != a->shape[i] || (a->shape[i] != 1 && stride_of(a, i) != stride_of(b, i)))
            return 0;
    return 1;
}

typedef void (*out_fn)(const void *, const void *, void *, int64_t, int64_t, double *, int64_t,
                       int);
/* [kind - ADDRELU_OUT][bf16]: the kernels that write a tensor. */
static const out_fn OUT_FNS[4][2] = {{gl_addrelu_out_f32, gl_addrelu_out_bf16},
                                     {gl_relugrad_f32, gl_relugrad_bf16},
                                     {gl_addrelu_only_f32, gl_addrelu_only_bf16},
                                     {gl_relugrad_only_f32, gl_relugrad_only_bf16}};

/* Kernel `kind` on the tensors of DLPack capsules a (and b; and dst for the kernels that write
 * one) into columns col.. of the float64 (rows, cap) table: col, or -1 with nothing written
 * when they are not what the kernels read (see dense_per_sample; b and dst must match a's
 * dtype, shape and strides), their samples are not `rows`, or the columns do not fit (the
 * _ONLY kernels take no sums: table, rows, cap and col are not used). The kernel runs with the
 * GIL released. */
static long long run_capsules(long long kind, PyObject *ca, PyObject *cb, PyObject *cdst,
                              double *table, long long rows, long long cap, long long col,
                              long long nthreads) {
    const int threads = nthreads < 1 ? 1 : nthreads > 4096 ? 4096 : (int)nthreads;
    const int writes = kind >= ADDRELU_OUT;
    const DLTensor *a = unwrap(ca);
    const DLTensor *b = kind == SQ ? NULL : unwrap(cb);
    const DLTensor *d = writes ? unwrap(cdst) : NULL;
    int64_t n = 0;
    int bf = 0;
    const int64_t per = a == NULL ? 0 : dense_per_sample(a, &n, &bf);
    const int sums = kind >= 0 && kind <= RELUGRAD_ONLY && nsums((int)kind) > 0;
    if (kind < 0 || kind > RELUGRAD_ONLY || per == 0 ||
        (sums && (table == NULL || n != rows || col < 0 || col > cap - nsums((int)kind))) ||
        (kind != SQ && (b == NULL || !same_layout(a, b))) ||
        (writes && (d == NULL || !same_layout(a, d))))
        return -1;
    const char *pa = (const char *)a->data + a->byte_offset;
    const char *pb = b == NULL ? NULL : (const char *)b->data + b->byte_offset;
    char *pd = d == NULL ? NULL : (char *)d->data + d->byte_offset;
    Py_BEGIN_ALLOW_THREADS
    if (writes)
        OUT_FNS[kind - ADDRELU_OUT][bf](pa, pb, pd, n, per, sums ? table + col : NULL,
                                        (int64_t)cap, threads);
    else
        KERNEL_FNS[kind][bf](pa, pb, (int64_t)rows, per, table + col, (int64_t)cap, threads);
    Py_END_ALLOW_THREADS
    return col;
}

/* The entries' shared body: args are (kind, a, b, [dst,] table, rows, capacity, col, threads),
 * dst present when `writes`; kinds outside the entry's range give -1. Each integer conversion is
 * checked before the next: none may run with an exception set. */
static PyObject *run_entry(PyObject *const *args, Py_ssize_t nargs, int writes) {
    const Py_ssize_t want = writes ? 9 : 8;
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", writes ? "run_out" : "run",
                     want);
        return NULL;
    }
    long long v[6]; /* kind, table, rows, capacity, col, threads */
    for (int i = 0; i < 6; i++) {
        v[i] = PyLong_AsLongLong(args[i == 0 ? 0 : i + 2 + writes]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    if (writes ? v[0] < ADDRELU_OUT : v[0] > ADDRELU) v[0] = -1;
    return PyLong_FromLongLong(run_capsules(v[0], args[1], args[2], writes ? args[3] : NULL,
                                            (double *)(intptr_t)v[1], v[2], v[3], v[4], v[5]));
}

/* run(kind, a, b, table, rows, capacity, col, threads) -> col, or -1 with nothing written.
 *
 * kind: index into KERNELS; a, b: DLPack capsules (b None for sq); table: address of a
 * contiguous float64 (rows, capacity) table; the kernel's K sums go to columns col..col+K-1.
 * -1 as run_capsules says: the caller then takes its checked path. The capsules are not
 * consumed (their tensors stay owned by them). */
static PyObject *gl_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return run_entry(args, nargs, 0);
}

/* run_out(kind, a, b, dst, table, rows, capacity, col, threads) -> col, or -1 with nothing
 * written: run() for the kernels that also write dst, a tensor of a's dtype, shape and strides
 * (kind 4: dst = relu(a + b); 5: dst = threshold_backward(a, b, 0); 6 and 7: the same without
 * sums). */
static PyObject *gl_run_out(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return run_entry(args, nargs, 1);
}

/* What grad_sq needs from Python, set once by configure(): torch's DLPack export and its
 * thread count, and the attribute names of the probe's table of sums. */
static PyObject *to_dlpack_fn, *threads_fn, *s_ptr, *s_rows, *s_cap, *s_used;

static PyObject *gl_configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "configure(to_dlpack, get_num_threads)");
        return NULL;
    }
    if (s_used == NULL) { /* all four or none (a failed call leaves them for the next) */
        PyObject *names[4] = {PyUnicode_InternFromString("_ptr"),
                              PyUnicode_InternFromString("_rows"),
                              PyUnicode_InternFromString("_cap"),
                              PyUnicode_InternFromString("used")};
        if (!names[0] || !names[1] || !names[2] || !names[3]) {
            for (int i = 0; i < 4; i++) Py_XDECREF(names[i]);
            return NULL;
        }
        s_ptr = names[0];
        s_rows = names[1];
        s_cap = names[2];
        s_used = names[3];
    }
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(to_dlpack_fn, args[0]);
    Py_XSETREF(threads_fn, args[1]);
    Py_RETURN_NONE;
}

/* obj.name as a long long into *out: 0, or -1 with an exception set. */
static int attr_ll(PyObject *obj, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* After a failed step of grad_sq: an Exception goes, as in the Python hook's try/except, to
 * the Python hook (its checked path); anything else (KeyboardInterrupt) propagates. */
static PyObject *hand_over(PyObject *fallback, PyObject *g) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyErr_Clear();
    return PyObject_CallOneArg(fallback, g);
}

/* grad_sq(table, cols, store, key, fallback, g): an autograd tensor hook (bound to its first
 * five arguments by functools.partial) that writes per-sample ||g||^2 into the next column of
 * the probe's SumTable `table` and records it as cols[key] = (col,) (dropping store[key]),
 * with no Python code run: what the probe's Python hook does for a dense CPU gradient. g None
 * (no gradient) does nothing. Anything else (no configure, an object DLPack cannot export or
 * the kernels do not read, a full table, another batch size, an Exception reading the table)
 * goes to fallback(g), the Python hook. */
static PyObject *gl_grad_sq(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6 || !PyDict_CheckExact(args[1]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "grad_sq(table, cols, store, key, fallback, g)");
        return NULL;
    }
    PyObject *table = args[0], *cols = args[1], *store = args[2], *key = args[3];
    PyObject *fallback = args[4], *g = args[5];
    if (g == Py_None) Py_RETURN_NONE;
    if (to_dlpack_fn == NULL) return PyObject_CallOneArg(fallback, g);
    long long ptr, rows, cap, used, threads;
    PyObject *nt = NULL;
    if (attr_ll(table, s_ptr, &ptr) < 0 || attr_ll(table, s_rows, &rows) < 0 ||
        attr_ll(table, s_cap, &cap) < 0 || attr_ll(table, s_used, &used) < 0 ||
        (nt = PyObject_CallNoArgs(threads_fn)) == NULL)
        return hand_over(fallback, g);
    threads = PyLong_AsLongLong(nt);
    Py_DECREF(nt);
    if (threads == -1 && PyErr_Occurred()) return hand_over(fallback, g);
    PyObject *capsule = PyObject_CallOneArg(to_dlpack_fn, g);
    if (capsule == NULL) return hand_over(fallback, g); /* not a tensor DLPack can export */
    const long long col =
        run_capsules(SQ, capsule, NULL, NULL, (double *)(intptr_t)ptr, rows, cap, used,
                     threads);
    Py_DECREF(capsule);
    if (col < 0) return PyObject_CallOneArg(fallback, g);
    PyObject *next = PyLong_FromLongLong(col + 1);
    PyObject *cell = Py_BuildValue("(L)", col);
    int bad = next == NULL || cell == NULL || PyObject_SetAttr(table, s_used, next) < 0 ||
              PyDict_SetItem(cols, key, cell) < 0;
    Py_XDECREF(next);
    Py_XDECREF(cell);
    if (bad) return NULL;
    if (PyDict_GET_SIZE(store) && PyDict_DelItem(store, key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) return NULL;
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyMethodDef gl_methods[] = {
    {"run", (PyCFunction)(void (*)(void))gl_run, METH_FASTCALL,
     "run(kind, a, b, table, rows, capacity, col, threads) -> col, or -1"},
    {"run_out", (PyCFunction)(void (*)(void))gl_run_out, METH_FASTCALL,
     "run_out(kind, a, b, dst, table, rows, capacity, col, threads) -> col, or -1"},
    {"configure", (PyCFunction)(void (*)(void))gl_configure, METH_FASTCALL,
     "configure(to_dlpack, get_num_threads)"},
    {"grad_sq", (PyCFunction)(void (*)(void))gl_grad_sq, METH_FASTCALL,
     "grad_sq(table, cols, store, key, fallback, g) -> None"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef gl_module = {
    PyModuleDef_HEAD_INIT, "_gradlab_kernels", NULL, -1, gl_methods, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__gradlab_kernels(void) {
    PyObject *module = PyModule_Create(&gl_module);
#ifdef Py_GIL_DISABLED
    /* run() touches no shared Python state (and releases the GIL where there is one);
     * grad_sq() changes the probe's objects only through the C API's own thread-safe calls
     * (PyObject_SetAttr, PyDict_SetItem), as the Python hook it replaces does. */
    if (module != NULL) PyUnstable_Module_SetGIL(module, Py_MOD_GIL_NOT_USED);
#endif
    return module;
}
#endif
