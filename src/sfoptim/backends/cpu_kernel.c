/*
 * Fused schedule-free kernels for CPU: one pass over memory per step.
 *
 * Plain C on purpose (no torch headers): gcc builds it in well under a second
 * on first use, see sfoptim/backends/cpu_kernel.py. That module also defines
 * the direction kinds (SF_SGD, SF_ADAM, SF_SGD_V) and the slot of every scalar
 * (SF_LR, SF_CKP1, ...) and bucket sum (SF_SUM_GRAD_L1, ...) on the command line, from the one declaration in
 * sfoptim/backends/abi.py (with the ABI version, SF_ABI_VERSION), so nothing here restates them. Every entry point takes arrays of
 * data pointers and element counts for a whole bucket of tensors, so one call
 * from Python updates every tensor of a (device, dtype) bucket, and the work is
 * cut into equal chunks across all tensors so that many small tensors keep all
 * threads busy as well as a few large ones.
 *
 * All tensors are dense and contiguous; complex ones arrive as real views.
 * Arithmetic is in the tensor's own precision, as torch's float32 ops are, and
 * lerp follows torch's two-sided formula so the kernel agrees with the foreach
 * path to rounding.
 *
 * Entry points: sf_step_<T> (the schedule-free step of one kernel family),
 * sf_wrap_before_<T> / sf_wrap_after_<T> (the wrapper's bookkeeping) and
 * sf_sums_<T> (the bucket sums of a direction's global reductions, taken
 * before the step in a pass of their own, since the step size depends on
 * their totals over all buckets).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* 16K elements: large enough to amortise the scheduling, small enough that
 * 400 tensors of 40K give dozens of chunks per thread. */
#define SF_CHUNK 16384
/* Below this many elements per thread a parallel region costs more than it
 * saves (a fork/join is microseconds idle, far more on a loaded machine). */
#define SF_MIN_PER_THREAD 32768

#if !defined(SF_ABI_VERSION) || !defined(SF_SGD) || !defined(SF_ADAM) || !defined(SF_SGD_V) || !defined(SF_LR) || !defined(SF_BC1) || \
    !defined(SF_SUM_GRAD_L1) || !defined(SF_SUM_GRAD_Z_MINUS_Y)
#error "build through sfoptim.backends.cpu_kernel, which defines the kinds and scalar slots"
#endif

/* The scalars of one step, indexed by the SF_<NAME> slots:
 *   lr    gamma_t after warmup/rectification     ckp1  averaging coefficient c_{t+1}
 *   beta  interpolation weight                   wd    weight decay, computed at y
 *   beta2 second-moment decay                    bc2   1 - beta2^t, or 1 without bias correction
 *   eps                                          mu    inner momentum (0: no exp_avg buffer)
 *   bc1   1 - mu^t */
typedef double sf_scalars;

/* Work list: chunk k covers elements [start, start+len) of tensor idx. */
typedef struct {
    int64_t idx, start, len;
} sf_chunk;

static sf_chunk *make_chunks(int64_t n, const int64_t *sizes, int64_t *count, int *nthreads) {
    int64_t total = 0, elems = 0;
    for (int64_t i = 0; i < n; i++) {
        total += (sizes[i] + SF_CHUNK - 1) / SF_CHUNK;
        elems += sizes[i];
    }
    if (*nthreads < 1) *nthreads = 1;
    if ((int64_t)*nthreads * SF_MIN_PER_THREAD > elems) {
        int64_t useful = elems / SF_MIN_PER_THREAD;
        *nthreads = useful > 1 ? (int)useful : 1;
    }
    sf_chunk *chunks = (sf_chunk *)malloc((size_t)(total > 0 ? total : 1) * sizeof(sf_chunk));
    if (!chunks) return NULL;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t s = 0; s < sizes[i]; s += SF_CHUNK) {
            chunks[k].idx = i;
            chunks[k].start = s;
            chunks[k].len = sizes[i] - s < SF_CHUNK ? sizes[i] - s : SF_CHUNK;
            k++;
        }
    }
    *count = total;
    return chunks;
}

/*
 * One element of the schedule-free step, written once per precision below.
 *   direction d = m_hat / (sqrt(v / bc2) + eps) + wd*y    (Adam; v updated first)
 *               = g + wd*y                                  (SGD, RAdam's SGD phase)
 *   y <- lerp(y, z, c) + lr*(beta*(1-c) - 1)*d;   z <- z - lr*d
 * `mode` and `has_m` are compile-time constants at every call site, so gcc
 * emits one branch-free vector loop per variant.
 */
#define SF_STEP_BODY(T, SQRT)                                                           \
    static inline __attribute__((always_inline)) void sf_step_span_##T(                 \
        T *restrict y, const T *restrict g, T *restrict z, T *restrict v, T *restrict m, \
        int64_t n, const sf_scalars *s, const int mode, const int has_m) {              \
        const T c = (T)s[SF_CKP1], lr = (T)s[SF_LR], wd = (T)s[SF_WD];                           \
        const T ystep = (T)(s[SF_LR] * (s[SF_BETA] * (1.0 - s[SF_CKP1]) - 1.0));                 \
        const T b2 = (T)s[SF_BETA2], omb2 = (T)(1.0 - s[SF_BETA2]), bc2 = (T)s[SF_BC2];          \
        const T eps = (T)s[SF_EPS], mu = (T)s[SF_MU], ommu = (T)(1.0 - s[SF_MU]), bc1 = (T)s[SF_BC1]; \
        const int upper = s[SF_CKP1] >= 0.5;                                                \
        const T omc = (T)(1.0 - s[SF_CKP1]);                                                \
        _Pragma("omp simd")                                                              \
        for (int64_t i = 0; i < n; i++) {                                                \
            const T yi = y[i], gi = g[i], zi = z[i];                                     \
            T d;                                                                         \
            if (mode == SF_SGD) {                                                        \
                d = gi;                                                                  \
            } else {                                                                     \
                const T vi = b2 * v[i] + omb2 * gi * gi;                                 \
                v[i] = vi;                                                               \
                if (mode == SF_ADAM) {                                                   \
                    T num = gi;                                                          \
                    if (has_m) {                                                         \
                        const T mi = m[i] + ommu * (gi - m[i]);                          \
                        m[i] = mi;                                                       \
                        num = mi / bc1;                                                  \
                    }                                                                    \
                    d = num / (SQRT(vi / bc2) + eps);                                    \
                } else {                                                                 \
                    d = gi;                                                              \
                }                                                                        \
            }                                                                            \
            d = d + wd * yi;                                                             \
            const T diff = zi - yi;                                                      \
            const T lerped = upper ? zi - diff * omc : yi + c * diff;                    \
            y[i] = lerped + ystep * d;                                                   \
            z[i] = zi - lr * d;                                                          \
        }                                                                                \
        (void)mu;                                                                        \
    }

SF_STEP_BODY(float, sqrtf)
SF_STEP_BODY(double, sqrt)

#define SF_STEP_ENTRY(T)                                                                 \
    int sf_step_##T(int64_t n, T **y, T **g, T **z, T **v, T **m, const int64_t *sizes, \
                    const sf_scalars *s, int mode, int nthreads) {                      \
        int64_t count = 0;                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                \
        if (!chunks) return -1;                                                          \
        const int has_m = m != 0;                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                           \
            const int64_t i = chunks[k].idx, o = chunks[k].start, len = chunks[k].len;   \
            T *yy = y[i] + o, *zz = z[i] + o;                                            \
            const T *gg = g[i] + o;                                                      \
            if (mode == SF_SGD) {                                                        \
                sf_step_span_##T(yy, gg, zz, 0, 0, len, s, SF_SGD, 0);                   \
            } else if (mode == SF_SGD_V) {                                               \
                sf_step_span_##T(yy, gg, zz, v[i] + o, 0, len, s, SF_SGD_V, 0);          \
            } else if (has_m) {                                                          \
                sf_step_span_##T(yy, gg, zz, v[i] + o, m[i] + o, len, s, SF_ADAM, 1);    \
            } else {                                                                     \
                sf_step_span_##T(yy, gg, zz, v[i] + o, 0, len, s, SF_ADAM, 0);           \
            }                                                                            \
        }                                                                                \
        free(chunks);                                                                    \
        return 0;                                                                        \
    }

SF_STEP_ENTRY(float)
SF_STEP_ENTRY(double)

/*
 * The wrapper's bookkeeping around its base optimizer, one pass each.
 *
 * before: z <- z - a*y (a = lr*decay); y <- y*(1 - a*(1-beta)); y <- lerp(y, z, w)
 *         with w = 1 - 1/beta, which leaves x in y (the wrapper then swaps).
 * after:  x <- lerp(x, z, c); x <- lerp(x, z, 1-beta), i.e. the new average and
 *         then the new y, in the parameter.
 * Both lerps are written out in torch's two-sided form, with the weight's side
 * chosen once per call.
 */
#define SF_LERP(T, a, b, w, upper) ((upper) ? (b) - ((b) - (a)) * ((T)1 - (w)) : (a) + (w) * ((b) - (a)))

#define SF_WRAP_ENTRIES(T)                                                               \
    int sf_wrap_before_##T(int64_t n, T **y, T **z, const int64_t *sizes, double a,     \
                           double beta, int nthreads) {                                 \
        int64_t count = 0;                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                \
        if (!chunks) return -1;                                                          \
        const T ta = (T)a, shrink = (T)(1.0 - a * (1.0 - beta)), w = (T)(1.0 - 1.0 / beta); \
        const int decay = a != 0.0, upper = (1.0 - 1.0 / beta) >= 0.5;                   \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                           \
            T *restrict yy = y[chunks[k].idx] + chunks[k].start;                         \
            T *restrict zz = z[chunks[k].idx] + chunks[k].start;                         \
            const int64_t len = chunks[k].len;                                           \
            if (decay) {                                                                 \
                _Pragma("omp simd")                                                      \
                for (int64_t i = 0; i < len; i++) {                                      \
                    const T yi = yy[i];                                                  \
                    const T zi = zz[i] - ta * yi;                                        \
                    const T ys = yi * shrink;                                            \
                    zz[i] = zi;                                                          \
                    yy[i] = SF_LERP(T, ys, zi, w, upper);                                \
                }                                                                        \
            } else {                                                                     \
                _Pragma("omp simd")                                                      \
                for (int64_t i = 0; i < len; i++) {                                      \
                    const T yi = yy[i], zi = zz[i];                                      \
                    yy[i] = SF_LERP(T, yi, zi, w, upper);                                \
                }                                                                        \
            }                                                                            \
        }                                                                                \
        free(chunks);                                                                    \
        return 0;                                                                        \
    }                                                                                    \
    int sf_wrap_after_##T(int64_t n, T **x, T **z, const int64_t *sizes, double c,      \
                          double beta, int nthreads) {                                  \
        int64_t count = 0;                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                \
        if (!chunks) return -1;                                                          \
        const T tc = (T)c, w = (T)(1.0 - beta);                                          \
        const int upper1 = c >= 0.5, upper2 = (1.0 - beta) >= 0.5;                       \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                           \
            T *restrict xx = x[chunks[k].idx] + chunks[k].start;                         \
            const T *restrict zz = z[chunks[k].idx] + chunks[k].start;                   \
            const int64_t len = chunks[k].len;                                           \
            _Pragma("omp simd")                                                          \
            for (int64_t i = 0; i < len; i++) {                                          \
                const T zi = zz[i];                                                      \
                const T xa = SF_LERP(T, xx[i], zi, tc, upper1);                          \
                xx[i] = SF_LERP(T, xa, zi, w, upper2);                                   \
            }                                                                            \
        }                                                                                \
        free(chunks);                                                                    \
        return 0;                                                                        \
    }

SF_WRAP_ENTRIES(float)
SF_WRAP_ENTRIES(double)

/*
 * Bucket sums for a direction's global reductions, one pass over g, z and y:
 *   out[SF_SUM_GRAD_L1] = sum |g|,   out[SF_SUM_GRAD_Z_MINUS_Y] = sum g*(z - y)
 * in double whatever T is. With gap == 0 only the first is taken and z, y are
 * not read (they may be null).
 *
 * The order of every addition is fixed by the data alone: within a chunk
 * SF_LANES running sums take every SF_LANES-th element (the tail goes to lane
 * 0) and are added in lane order; each chunk writes its partials to its own
 * slot, and the slots are added in chunk order after the parallel loop. Chunk
 * boundaries do not depend on the thread count, so the result is the same
 * bit for bit for any number of threads and any schedule.
 */
#define SF_LANES 8

#define SF_SUMS_ENTRY(T)                                                                 \
    int sf_sums_##T(int64_t n, T **g, T **z, T **y, const int64_t *sizes, int gap,       \
                    double *out, int nthreads) {                                         \
        int64_t count = 0;                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                     \
        if (!chunks) return -1;                                                          \
        double *part = (double *)malloc((size_t)(count > 0 ? count : 1) * 2 * sizeof(double)); \
        if (!part) {                                                                     \
            free(chunks);                                                                \
            return -1;                                                                   \
        }                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)") \
        for (int64_t k = 0; k < count; k++) {                                           \
            const int64_t idx = chunks[k].idx, o = chunks[k].start, len = chunks[k].len; \
            const T *restrict gg = g[idx] + o;                                           \
            double l1[SF_LANES] = {0}, ip[SF_LANES] = {0};                               \
            int64_t i = 0;                                                               \
            if (gap) {                                                                   \
                const T *restrict zz = z[idx] + o, *restrict yy = y[idx] + o;            \
                for (; i + SF_LANES <= len; i += SF_LANES) {                             \
                    _Pragma("omp simd")                                                  \
                    for (int j = 0; j < SF_LANES; j++) {                                 \
                        const double gj = (double)gg[i + j];                             \
                        l1[j] += fabs(gj);                                               \
                        ip[j] += gj * ((double)zz[i + j] - (double)yy[i + j]);           \
                    }                                                                    \
                }                                                                        \
                for (; i < len; i++) {                                                   \
                    const double gi = (double)gg[i];                                     \
                    l1[0] += fabs(gi);                                                   \
                    ip[0] += gi * ((double)zz[i] - (double)yy[i]);                       \
                }                                                                        \
            } else {                                                                     \
                for (; i + SF_LANES <= len; i += SF_LANES) {                             \
                    _Pragma("omp simd")                                                  \
                    for (int j = 0; j < SF_LANES; j++) l1[j] += fabs((double)gg[i + j]); \
                }                                                                        \
                for (; i < len; i++) l1[0] += fabs((double)gg[i]);                       \
            }                                                                            \
            double a = 0.0, b = 0.0;                                                     \
            for (int j = 0; j < SF_LANES; j++) {                                         \
                a += l1[j];                                                              \
                b += ip[j];                                                              \
            }                                                                            \
            part[2 * k] = a;                                                             \
            part[2 * k + 1] = b;                                                         \
        }                                                                                \
        double a = 0.0, b = 0.0;                                                         \
        for (int64_t k = 0; k < count; k++) {                                           \
            a += part[2 * k];                                                            \
            b += part[2 * k + 1];                                                        \
        }                                                                                \
        out[SF_SUM_GRAD_L1] = a;                                                         \
        out[SF_SUM_GRAD_Z_MINUS_Y] = b;                                                  \
        free(part);                                                                      \
        free(chunks);                                                                    \
        return 0;                                                                        \
    }

SF_SUMS_ENTRY(float)
SF_SUMS_ENTRY(double)

/* Lets the loader check that the library it found is the one it built. */
int sf_abi_version(void) { return SF_ABI_VERSION; }
