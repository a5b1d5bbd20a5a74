/*
 * Fused schedule-free kernels for CPU: one pass over memory per step.
 *
 * Plain C on purpose (no torch headers): gcc builds it in a few seconds on
 * first use, see sfoptim/backends/cpu_kernel.py. That module also defines
 * the direction kinds (SF_SGD, SF_ADAM, SF_SGD_V) and the slot of every scalar
 * (SF_LR, SF_CKP1, ...) and bucket sum (SF_SUM_GRAD_L1, ...) on the command line, from the one declaration in
 * sfoptim/backends/abi.py (with the ABI version, SF_ABI_VERSION), so nothing here restates them. Every entry point takes arrays of
 * data pointers and element counts for a whole bucket of tensors, so one call
 * from Python updates every tensor of a (device, dtype) bucket, and the work is
 * cut into equal chunks across all tensors so that many small tensors keep all
 * threads busy as well as a few large ones.
 *
 * All tensors are dense and contiguous; complex ones arrive as real views.
 * Storage formats: float64 (computed in double), float32, bfloat16 and
 * float16 (all three computed in float). A 16-bit element is widened to float
 * exactly when it is read and rounded once when it is written: to nearest
 * (ties to even), or stochastically (see "Rounding" below). lerp follows
 * torch's two-sided formula so the kernel agrees with the foreach path to
 * rounding (for 16-bit tensors: with the foreach path run in float32 and
 * rounded once).
 *
 * Entry points, for <T> in float, double, bfloat16, float16: sf_step_<T> (the
 * schedule-free step of one kernel family), sf_wrap_before_<T> /
 * sf_wrap_after_<T> (the wrapper's bookkeeping) and sf_sums_<T> (the bucket sums of a direction's global reductions, taken
 * before the step in a pass of their own, since the step size depends on
 * their totals over all buckets); and Prodigy's sf_prodigy_step_<P>_<B> and
 * sf_prodigy_sums_<P>_<B>, whose buffers have a format of their own (last
 * section).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
/* float16 <-> float32 in hardware (vcvtph2ps / vcvtps2ph), 8 at a time. */
#define SF_F16C 1
#else
#define SF_F16C 0
#endif

/* 16K elements: large enough to amortise the scheduling, small enough that
 * 400 tensors of 40K give dozens of chunks per thread. */
#define SF_CHUNK 16384
/* Below this many elements per thread a parallel region costs more than it
 * saves (a fork/join is microseconds idle, far more on a loaded machine). */
#define SF_MIN_PER_THREAD 32768

#if !defined(SF_ABI_VERSION) || !defined(SF_SGD) || !defined(SF_ADAM) || !defined(SF_SGD_V) || !defined(SF_LR) || !defined(SF_BC1) || \
    !defined(SF_SUM_GRAD_L1) || !defined(SF_SUM_GRAD_Z_MINUS_Y) || !defined(SF_PRODIGY) || !defined(SF_CLIP) || \
    !defined(SF_SUM_GRAD_P0_MINUS_Z) || !defined(SF_SUM_DECAYED_L1) || !defined(SF_WDZ)
#error "build through sfoptim.backends.cpu_kernel, which defines the kinds and scalar slots"
#endif

/* The scalars of one step, indexed by the SF_<NAME> slots:
 *   lr    gamma_t after warmup/rectification     ckp1  averaging coefficient c_{t+1}
 *   beta  interpolation weight                   wd    weight decay, computed at y
 *   beta2 second-moment decay                    bc2   1 - beta2^t, or 1 without bias correction
 *   eps                                          mu    inner momentum (0: no exp_avg buffer)
 *   bc1   1 - mu^t                               wdz   weight decay computed at z instead (when nonzero;
 *                                                      the step and Prodigy kernels, not the low-bit one) */
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
 * Storage formats. bfloat16 is the top half of a float32; float16 has 5
 * exponent and 10 mantissa bits. Conversions are integer operations and
 * selects (no lookup, no branch, no instruction set beyond the baseline), so
 * the element loops vectorise on any x86-64 or arm64 CPU; where the compiler
 * targets F16C, float16 is widened and rounded to nearest by its instructions
 * instead (same results, NaN payloads aside).
 */
typedef uint16_t sf_bf16;
typedef uint16_t sf_f16;

static inline float sf_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t sf_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* a if c else b, for c in {0, 1}: an integer select that vectorises on every
 * target (a ternary on floats may be kept as a branch, since a float compare
 * can trap). */
static inline uint32_t sf_select(uint32_t c, uint32_t a, uint32_t b) {
    const uint32_t mask = 0u - c;
    return (a & mask) | (b & ~mask);
}

static inline float sf_bf16_load(sf_bf16 h) { return sf_from_bits((uint32_t)h << 16); }

/* Round to nearest, ties to even; NaN becomes the quiet NaN 0x7fc0 (as torch rounds). */
static inline sf_bf16 sf_bf16_nearest(float f) {
    const uint32_t u = sf_to_bits(f);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    /* NaN by a float compare: without AVX-512 an unsigned compare and a mask
     * select cost about as much as the rest of a bfloat16 step. */
    return (sf_bf16)(f != f ? 0x7fc0u : r);
}

/* Stochastic: add 16 uniform random bits below the kept ones and truncate the
 * magnitude, which rounds up with probability equal to the distance to the
 * lower neighbour in units of the gap. Infinities and NaN round to nearest. */
static inline sf_bf16 sf_bf16_stochastic(float f, uint32_t rnd) {
    const uint32_t u = sf_to_bits(f);
    const uint32_t r = (u + (rnd >> 16)) >> 16; /* an infinity stays itself: its low 16 bits are 0 */
    return (sf_bf16)(f != f ? 0x7fc0u : r);
}

static inline float sf_f16_load(sf_f16 h) {
    const uint32_t em = (uint32_t)(h & 0x7fffu) << 13, sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = em & 0x0f800000u;
    const uint32_t normal = em + (112u << 23);  /* rebias 15 -> 127 */
    const uint32_t special = em + (224u << 23); /* exponent 31 -> 255: inf, NaN */
    /* subnormal (and zero): em as a float with exponent 113, minus 2^-14, is exactly m * 2^-24 */
    const uint32_t sub = sf_to_bits(sf_from_bits(em + (113u << 23)) - sf_from_bits(113u << 23));
    return sf_from_bits(sf_select(e == 0x0f800000u, special, sf_select(e == 0, sub, normal)) | sign);
}

/* Round to nearest, ties to even; overflow gives inf, NaN the quiet NaN 0x7e00. */
static inline sf_f16 sf_f16_nearest(float f) {
    const uint32_t u = sf_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    const uint32_t big = sf_select(a > 0x7f800000u, 0x7e00u, 0x7c00u);
    /* Below 2^-14 the result is subnormal: adding 0.5 lets the float adder
     * round to a multiple of 2^-24, in the low bits of the sum. */
    const uint32_t sub = sf_to_bits(sf_from_bits(a) + 0.5f) - (126u << 23);
    const uint32_t norm = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    return (sf_f16)(sf_select(a >= (143u << 23), big, sf_select(a < (113u << 23), sub, norm)) | sign);
}

/* Stochastic: in the normal range 13 random bits below the kept ones, as for
 * bfloat16; in the subnormal range (a fixed gap of 2^-24) the fraction of the
 * gap, to 24 bits, against 24 random bits. Values that round to nearest to
 * inf or NaN do so. */
static inline sf_f16 sf_f16_stochastic(float f, uint32_t rnd) {
    const uint32_t u = sf_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    const uint32_t subnormal = a < (113u << 23);
    const float q = sf_from_bits(sf_select(subnormal, a, 0u)) * 16777216.0f; /* |f| / 2^-24 < 1024, exact */
    const int32_t whole = (int32_t)q;
    const int32_t frac = (int32_t)((q - (float)whole) * 16777216.0f);
    const uint32_t sub = (uint32_t)whole + ((uint32_t)frac > (rnd >> 8));
    const uint32_t norm = (a - (112u << 23) + (rnd & 0x1fffu)) >> 13;
    return (sf_f16)sf_select(a >= (143u << 23), sf_f16_nearest(f), sf_select(subnormal, sub, norm) | sign);
}

/*
 * Rounding. Stochastic rounding draws one 32-bit number per written element
 * from a counter-based hash of (seed, stream, tensor, element index): the
 * caller passes a fresh seed per step, every written stream (y, z, v, m) has
 * its own numbers, and since an element's number depends on nothing else,
 * the result is the same for any thread count and any chunking.
 */
enum { SF_STREAM_Y, SF_STREAM_Z, SF_STREAM_V, SF_STREAM_M, SF_STREAMS };

typedef struct {
    uint32_t a, b;
} sf_key;

static inline uint64_t sf_splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* The key of a stream of one tensor, for the 2^32 elements from start & ~(2^32-1). */
static inline sf_key sf_key_for(uint64_t seed, int stream, int64_t tensor, int64_t start) {
    const uint64_t h = sf_splitmix64(seed ^ sf_splitmix64(((uint64_t)tensor << 2 | (uint64_t)stream) ^
                                                          sf_splitmix64((uint64_t)start >> 32)));
    sf_key k = {(uint32_t)h, (uint32_t)(h >> 32)};
    return k;
}

static inline uint32_t sf_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

static inline uint32_t sf_random(sf_key k, uint32_t index) { return sf_mix32(sf_mix32(index ^ k.a) + k.b); }

/* Loads and stores of each format; the stochastic store of float and double is the plain one. */
#define SF_LOAD_float(x) (x)
#define SF_LOAD_double(x) (x)
#define SF_LOAD_bf16(x) sf_bf16_load(x)
#define SF_LOAD_f16(x) sf_f16_load(x)
#define SF_NEAR_float(x) (x)
#define SF_NEAR_double(x) (x)
#define SF_NEAR_bf16(x) sf_bf16_nearest(x)
#define SF_NEAR_f16(x) sf_f16_nearest(x)
#define SF_SR_float(x, r) (x)
#define SF_SR_double(x, r) (x)
#define SF_SR_bf16(x, r) sf_bf16_stochastic(x, r)
#define SF_SR_f16(x, r) sf_f16_stochastic(x, r)

/*
 * One element of the schedule-free step, written once per storage format below
 * (S stored, T computed, LD/ST the load and the round-to-nearest store).
 *   direction d = m_hat / (sqrt(v / bc2) + eps) + wd*y    (Adam; v updated first)
 *               = g + wd*y                                  (SGD, RAdam's SGD phase)
 *   (with wdz nonzero: + wdz*z in place of + wd*y, selected per element, no extra pass)
 *   y <- lerp(y, z, c) + lr*(beta*(1-c) - 1)*d;   z <- z - lr*d
 * m_hat is g, or with the m buffer (has_m) m <- lerp(m, g, 1-mu), m_hat = m/bc1;
 * with mu = 0 that lerp is g (torch's two-sided lerp gives it exactly), so m
 * is written without being read (SF_M_COPY: one stream less per step).
 * `mode` and `has_m` are compile-time constants at every call site, so gcc
 * emits one branch-free vector loop per variant.
 */
enum { SF_M_NONE, SF_M_EMA, SF_M_COPY };
/* a if c else b, as a bit select for float (a float ternary may stay a branch, see sf_select). */
#define SF_PICK_float(c, a, b) sf_from_bits(sf_select((uint32_t)(c), sf_to_bits(a), sf_to_bits(b)))
#define SF_PICK_double(c, a, b) ((c) ? (a) : (b))

#define SF_STEP_BODY(NAME, S, T, SQRT, LD, ST)                                                                            \
    static inline __attribute__((always_inline)) void sf_step_span_##NAME(                                 \
        S *restrict y, const S *restrict g, S *restrict z, S *restrict v, S *restrict m, int64_t n,      \
        const sf_scalars *s, const int mode, const int has_m) {                                          \
        const int atz = s[SF_WDZ] != 0.0; /* decay at z (wdz) instead of at y (wd) */                  \
        const T c = (T)s[SF_CKP1], lr = (T)s[SF_LR], wd = (T)(atz ? s[SF_WDZ] : s[SF_WD]);               \
        const T ystep = (T)(s[SF_LR] * (s[SF_BETA] * (1.0 - s[SF_CKP1]) - 1.0));                         \
        const T b2 = (T)s[SF_BETA2], omb2 = (T)(1.0 - s[SF_BETA2]), bc2 = (T)s[SF_BC2];                  \
        const T eps = (T)s[SF_EPS], ommu = (T)(1.0 - s[SF_MU]), bc1 = (T)s[SF_BC1];                      \
        const int upper = s[SF_CKP1] >= 0.5;                                                             \
        const T omc = (T)(1.0 - s[SF_CKP1]);                                                             \
        _Pragma("omp simd")                                                                              \
        for (int64_t i = 0; i < n; i++) {                                                                \
            const T yi = LD(y[i]), gi = LD(g[i]), zi = LD(z[i]);                                                     \
            T d;                                                                                         \
            if (mode == SF_SGD) {                                                                        \
                d = gi;                                                                                  \
            } else {                                                                                     \
                const T vi = b2 * LD(v[i]) + omb2 * gi * gi;                                                 \
                v[i] = ST(vi);                                                                               \
                if (mode == SF_ADAM) {                                                                   \
                    T num = gi;                                                                          \
                    if (has_m) {                                                                         \
                        /* has_m == SF_M_COPY (mu = 0): m <- g, as torch's lerp with weight 1 gives it */ \
                        T mi = gi;                                                                       \
                        if (has_m == SF_M_EMA) {                                                         \
                            const T mo = LD(m[i]);                                                       \
                            mi = mo + ommu * (gi - mo);                                                  \
                        }                                                                                \
                        m[i] = ST(mi);                                                                   \
                        num = mi / bc1;                                                                  \
                    }                                                                                    \
                    d = num / (SQRT(vi / bc2) + eps);                                                    \
                } else {                                                                                 \
                    d = gi;                                                                              \
                }                                                                                        \
            }                                                                                            \
            d = d + wd * SF_PICK_##T(atz, zi, yi);                                                       \
            const T diff = zi - yi;                                                                      \
            const T from_z = zi - diff * omc, from_y = yi + c * diff;           \
            const T lerped = SF_PICK_##T(upper, from_z, from_y);                                    \
            y[i] = ST(lerped + ystep * d);                                                                   \
            z[i] = ST(zi - lr * d);                                                                          \
        }                                                                                                \
    }

SF_STEP_BODY(float, float, float, sqrtf, SF_LOAD_float, SF_NEAR_float)
SF_STEP_BODY(double, double, double, sqrt, SF_LOAD_double, SF_NEAR_double)
SF_STEP_BODY(bf16_near, sf_bf16, float, sqrtf, SF_LOAD_bf16, SF_NEAR_bf16)
SF_STEP_BODY(f16_near, sf_f16, float, sqrtf, SF_LOAD_f16, SF_NEAR_f16)

/*
 * 16-bit formats. Rounding to nearest runs the element loop above directly
 * on the 16-bit arrays (sf_step_span_<F>_near: widen on load, round on
 * store). Stochastic rounding works in blocks that are widened into float
 * arrays on the stack, stepped by the float loop and rounded back, one simple
 * loop per stream, so the hashing stays out of the arithmetic loop; the blocks
 * stay in L1, so memory traffic is that of the 16-bit tensors alone. `keys`
 * and `base` (the index of element 0 in its tensor, modulo 2^32) give each
 * element its random bits. Every loop vectorises on any target.
 */
#define SF_BLOCK 512

/* Conversions in hardware where the compiler targets it (float16 with F16C):
 * they take the leading multiple of 8 elements of a block, the portable loop
 * the rest, and round to nearest in blocks rather than in the element loop. */
#define SF_WIDEN_HW_bf16(out, in, n) ((int64_t)0)
#define SF_NARROW_HW_bf16(out, in, n) ((int64_t)0)
#define SF_NEAR_INLINE_bf16 1
#if SF_F16C
static inline int64_t sf_widen_hw_f16(float *restrict out, const sf_f16 *restrict in, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    return i;
}
static inline int64_t sf_narrow_hw_f16(sf_f16 *restrict out, const float *restrict in, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return i;
}
#define SF_WIDEN_HW_f16(out, in, n) sf_widen_hw_f16(out, in, n)
#define SF_NARROW_HW_f16(out, in, n) sf_narrow_hw_f16(out, in, n)
#define SF_NEAR_INLINE_f16 0
#else
#define SF_WIDEN_HW_f16(out, in, n) ((int64_t)0)
#define SF_NARROW_HW_f16(out, in, n) ((int64_t)0)
#define SF_NEAR_INLINE_f16 1
#endif

#define SF_LOWP_SPAN(F, S)                                                                               \
    static __attribute__((noinline)) void sf_widen_##F(float *restrict out, const S *restrict in, int64_t n) { \
        const int64_t done = SF_WIDEN_HW_##F(out, in, n);                                                \
        _Pragma("omp simd")                                                                              \
        for (int64_t i = done; i < n; i++) out[i] = SF_LOAD_##F(in[i]);                                  \
    }                                                                                                    \
    static __attribute__((noinline)) void sf_narrow_##F(S *restrict out, const float *restrict in, int64_t n, int sr, \
                                     sf_key key, uint32_t base) {                                        \
        if (sr) {                                                                                        \
            _Pragma("omp simd")                                                                          \
            for (int64_t i = 0; i < n; i++) out[i] = SF_SR_##F(in[i], sf_random(key, base + (uint32_t)i)); \
        } else {                                                                                         \
            const int64_t done = SF_NARROW_HW_##F(out, in, n);                                           \
            _Pragma("omp simd")                                                                          \
            for (int64_t i = done; i < n; i++) out[i] = SF_NEAR_##F(in[i]);                              \
        }                                                                                                \
    }                                                                                                    \
    static inline __attribute__((always_inline)) void sf_step_span_##F(                                 \
        S *restrict y, const S *restrict g, S *restrict z, S *restrict v, S *restrict m, int64_t n,      \
        const sf_scalars *s, const int mode, const int has_m, const int sr, const sf_key *keys,          \
        uint32_t base) {                                                                                 \
        if (!sr && SF_NEAR_INLINE_##F) {                                                                 \
            sf_step_span_##F##_near(y, g, z, v, m, n, s, mode, has_m);                                   \
            return;                                                                                      \
        }                                                                                                \
        float yb[SF_BLOCK], gb[SF_BLOCK], zb[SF_BLOCK], vb[SF_BLOCK], mb[SF_BLOCK];                      \
        for (int64_t o = 0; o < n; o += SF_BLOCK) {                                                      \
            const int64_t len = n - o < SF_BLOCK ? n - o : SF_BLOCK;                                     \
            const uint32_t at = base + (uint32_t)o;                                                      \
            sf_widen_##F(yb, y + o, len);                                                                \
            sf_widen_##F(gb, g + o, len);                                                                \
            sf_widen_##F(zb, z + o, len);                                                                \
            if (mode != SF_SGD) sf_widen_##F(vb, v + o, len);                                            \
            if (has_m == SF_M_EMA) sf_widen_##F(mb, m + o, len);                                         \
            sf_step_span_float(yb, gb, zb, vb, mb, len, s, mode, has_m);                                 \
            sf_narrow_##F(y + o, yb, len, sr, keys[SF_STREAM_Y], at);                                    \
            sf_narrow_##F(z + o, zb, len, sr, keys[SF_STREAM_Z], at);                                    \
            if (mode != SF_SGD) sf_narrow_##F(v + o, vb, len, sr, keys[SF_STREAM_V], at);                \
            if (has_m) sf_narrow_##F(m + o, mb, len, sr, keys[SF_STREAM_M], at);                         \
        }                                                                                                \
    }

SF_LOWP_SPAN(bf16, sf_bf16)
SF_LOWP_SPAN(f16, sf_f16)

/* float and double spans take (and ignore) the rounding arguments. */
#define sf_step_span_float_r(y, g, z, v, m, n, s, mode, has_m, sr, keys, base) \
    sf_step_span_float(y, g, z, v, m, n, s, mode, has_m)
#define sf_step_span_double_r(y, g, z, v, m, n, s, mode, has_m, sr, keys, base) \
    sf_step_span_double(y, g, z, v, m, n, s, mode, has_m)
#define sf_step_span_bf16_r sf_step_span_bf16
#define sf_step_span_f16_r sf_step_span_f16

/* One span of a chunk in the variant the call asks for (constant family and momentum flags). */
#define SF_SPAN(F, MODE, HAS_M, SR) sf_step_span_##F##_r(yy, gg, zz, vv, mm, len, s, MODE, HAS_M, SR, keys, (uint32_t)o)

#define SF_SPAN_MODES(F, SR)                                                                             \
    do {                                                                                                 \
        if (mode == SF_SGD) {                                                                            \
            SF_SPAN(F, SF_SGD, 0, SR);                                                                   \
        } else if (mode == SF_SGD_V) {                                                                   \
            SF_SPAN(F, SF_SGD_V, 0, SR);                                                                 \
        } else if (has_m == SF_M_EMA) {                                                                  \
            SF_SPAN(F, SF_ADAM, SF_M_EMA, SR);                                                           \
        } else if (has_m == SF_M_COPY) {                                                                 \
            SF_SPAN(F, SF_ADAM, SF_M_COPY, SR);                                                          \
        } else {                                                                                         \
            SF_SPAN(F, SF_ADAM, SF_M_NONE, SR);                                                          \
        }                                                                                                \
    } while (0)

/* sf_step_<name>: `stochastic` (with `seed`) selects stochastic rounding of
 * every written element; float and double ignore both. */
#define SF_STEP_ENTRY(NAME, F, S)                                                                        \
    int sf_step_##NAME(int64_t n, S **y, S **g, S **z, S **v, S **m, const int64_t *sizes,              \
                       const sf_scalars *s, int mode, int stochastic, uint64_t seed, int nthreads) {     \
        int64_t count = 0;                                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                     \
        if (!chunks) return -1;                                                                          \
        const int has_m = m == 0 ? SF_M_NONE : s[SF_MU] == 0.0 ? SF_M_COPY : SF_M_EMA;                  \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                                            \
            const int64_t i = chunks[k].idx, o = chunks[k].start, len = chunks[k].len;                   \
            S *yy = y[i] + o, *zz = z[i] + o;                                                            \
            const S *gg = g[i] + o;                                                                      \
            S *vv = mode == SF_SGD ? 0 : v[i] + o, *mm = has_m ? m[i] + o : 0;                           \
            sf_key keys[SF_STREAMS] = {{0, 0}};                                                          \
            (void)keys;                                                                                  \
            if (stochastic)                                                                              \
                for (int st = 0; st < SF_STREAMS; st++) keys[st] = sf_key_for(seed, st, i, o);           \
            SF_SPAN_MODES(F, stochastic);                                                                \
        }                                                                                                \
        free(chunks);                                                                                    \
        return 0;                                                                                        \
    }

SF_STEP_ENTRY(float, float, float)
SF_STEP_ENTRY(double, double, double)
SF_STEP_ENTRY(bfloat16, bf16, sf_bf16)
SF_STEP_ENTRY(float16, f16, sf_f16)

/*
 * The wrapper's bookkeeping around its base optimizer, one pass each.
 *
 * before: z <- z - a*y (a = lr*decay); y <- y*(1 - a*(1-beta)); y <- lerp(y, z, w)
 *         with w = 1 - 1/beta, which leaves x in y (the wrapper then swaps).
 * after:  x <- lerp(x, z, c); x <- lerp(x, z, 1-beta), i.e. the new average and
 *         then the new y, in the parameter.
 * Both lerps are written out in torch's two-sided form, with the weight's side
 * chosen once per call. 16-bit formats are computed in float and rounded to
 * nearest.
 */
static inline float sf_lerp_float(float a, float b, float w, int upper) {
    const float from_b = b - (b - a) * (1.0f - w), from_a = a + w * (b - a);
    return upper ? from_b : from_a;
}

static inline double sf_lerp_double(double a, double b, double w, int upper) {
    const double from_b = b - (b - a) * (1.0 - w), from_a = a + w * (b - a);
    return upper ? from_b : from_a;
}

#define SF_LERP(C, a, b, w, upper) sf_lerp_##C(a, b, w, upper)

#define SF_WRAP_ENTRIES(NAME, F, S, C)                                                                   \
    int sf_wrap_before_##NAME(int64_t n, S **y, S **z, const int64_t *sizes, double a, double beta,     \
                              int nthreads) {                                                            \
        int64_t count = 0;                                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                     \
        if (!chunks) return -1;                                                                          \
        const C ta = (C)a, shrink = (C)(1.0 - a * (1.0 - beta)), w = (C)(1.0 - 1.0 / beta);              \
        const int decay = a != 0.0, upper = (1.0 - 1.0 / beta) >= 0.5;                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                                            \
            S *restrict yy = y[chunks[k].idx] + chunks[k].start;                                         \
            S *restrict zz = z[chunks[k].idx] + chunks[k].start;                                         \
            const int64_t len = chunks[k].len;                                                           \
            if (decay) {                                                                                 \
                _Pragma("omp simd")                                                                      \
                for (int64_t i = 0; i < len; i++) {                                                      \
                    const C yi = SF_LOAD_##F(yy[i]);                                                     \
                    const C zi = SF_LOAD_##F(zz[i]) - ta * yi;                                           \
                    const C ys = yi * shrink;                                                            \
                    zz[i] = SF_NEAR_##F(zi);                                                             \
                    yy[i] = SF_NEAR_##F(SF_LERP(C, ys, zi, w, upper));                                   \
                }                                                                                        \
            } else {                                                                                     \
                _Pragma("omp simd")                                                                      \
                for (int64_t i = 0; i < len; i++) {                                                      \
                    const C yi = SF_LOAD_##F(yy[i]), zi = SF_LOAD_##F(zz[i]);                            \
                    yy[i] = SF_NEAR_##F(SF_LERP(C, yi, zi, w, upper));                                   \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        free(chunks);                                                                                    \
        return 0;                                                                                        \
    }                                                                                                    \
    int sf_wrap_after_##NAME(int64_t n, S **x, S **z, const int64_t *sizes, double c, double beta,      \
                             int nthreads) {                                                             \
        int64_t count = 0;                                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                     \
        if (!chunks) return -1;                                                                          \
        const C tc = (C)c, w = (C)(1.0 - beta);                                                          \
        const int upper1 = c >= 0.5, upper2 = (1.0 - beta) >= 0.5;                                       \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                                            \
            S *restrict xx = x[chunks[k].idx] + chunks[k].start;                                         \
            const S *restrict zz = z[chunks[k].idx] + chunks[k].start;                                   \
            const int64_t len = chunks[k].len;                                                           \
            _Pragma("omp simd")                                                                          \
            for (int64_t i = 0; i < len; i++) {                                                          \
                const C zi = SF_LOAD_##F(zz[i]);                                                         \
                const C xa = SF_LERP(C, SF_LOAD_##F(xx[i]), zi, tc, upper1);                             \
                xx[i] = SF_NEAR_##F(SF_LERP(C, xa, zi, w, upper2));                                      \
            }                                                                                            \
        }                                                                                                \
        free(chunks);                                                                                    \
        return 0;                                                                                        \
    }

SF_WRAP_ENTRIES(float, float, float, float)
SF_WRAP_ENTRIES(double, double, double, double)
SF_WRAP_ENTRIES(bfloat16, bf16, sf_bf16, float)
SF_WRAP_ENTRIES(float16, f16, sf_f16, float)

/* The totals of a sums pass: each chunk's two partial sums, added in chunk order
 * (fixed by the data, not by the thread count) into out[first] and out[second]. */
static void sf_add_parts(const double *part, int64_t count, double *out, int first, int second) {
    double a = 0.0, b = 0.0;
    for (int64_t k = 0; k < count; k++) {
        a += part[2 * k];
        b += part[2 * k + 1];
    }
    out[first] = a;
    out[second] = b;
}

/*
 * Bucket sums for a direction's global reductions, one pass over g, z and y:
 *   out[SF_SUM_GRAD_L1] = sum |g|,   out[SF_SUM_GRAD_Z_MINUS_Y] = sum g*(z - y)
 * in double whatever the storage format is (every element widens exactly).
 * With gap == 0 only the first is taken and z, y are not read (they may be
 * null).
 *
 * The order of every addition is fixed by the data alone: within a chunk
 * SF_LANES running sums take every SF_LANES-th element (the tail goes to lane
 * 0) and are added in lane order; each chunk writes its partials to its own
 * slot, and the slots are added in chunk order after the parallel loop. Chunk
 * boundaries do not depend on the thread count, so the result is the same
 * bit for bit for any number of threads and any schedule. 32 lanes give the
 * vectoriser whole vectors of doubles and independent chains of additions
 * (with 8, gcc 12 widened the elements two at a time, and the pass over
 * bfloat16 tensors took 2.5 times as long).
 */
#define SF_LANES 32
#define SF_WIDE(F, x) ((double)SF_LOAD_##F(x))

#define SF_SUMS_ENTRY(NAME, F, S)                                                                        \
    int sf_sums_##NAME(int64_t n, S **g, S **z, S **y, const int64_t *sizes, int gap, double *out,      \
                       int nthreads) {                                                                   \
        int64_t count = 0;                                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                     \
        if (!chunks) return -1;                                                                          \
        double *part = (double *)malloc((size_t)(count > 0 ? count : 1) * 2 * sizeof(double));           \
        if (!part) {                                                                                     \
            free(chunks);                                                                                \
            return -1;                                                                                   \
        }                                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                                            \
            const int64_t idx = chunks[k].idx, o = chunks[k].start, len = chunks[k].len;                 \
            const S *restrict gg = g[idx] + o;                                                           \
            double l1[SF_LANES] = {0}, ip[SF_LANES] = {0};                                               \
            int64_t i = 0;                                                                               \
            if (gap) {                                                                                   \
                const S *restrict zz = z[idx] + o, *restrict yy = y[idx] + o;                            \
                for (; i + SF_LANES <= len; i += SF_LANES) {                                             \
                    _Pragma("omp simd")                                                                  \
                    for (int j = 0; j < SF_LANES; j++) {                                                 \
                        const double gj = SF_WIDE(F, gg[i + j]);                                         \
                        l1[j] += fabs(gj);                                                               \
                        ip[j] += gj * (SF_WIDE(F, zz[i + j]) - SF_WIDE(F, yy[i + j]));                   \
                    }                                                                                    \
                }                                                                                        \
                for (; i < len; i++) {                                                                   \
                    const double gi = SF_WIDE(F, gg[i]);                                                 \
                    l1[0] += fabs(gi);                                                                   \
                    ip[0] += gi * (SF_WIDE(F, zz[i]) - SF_WIDE(F, yy[i]));                               \
                }                                                                                        \
            } else {                                                                                     \
                for (; i + SF_LANES <= len; i += SF_LANES) {                                             \
                    _Pragma("omp simd")                                                                  \
                    for (int j = 0; j < SF_LANES; j++) l1[j] += fabs(SF_WIDE(F, gg[i + j]));             \
                }                                                                                        \
                for (; i < len; i++) l1[0] += fabs(SF_WIDE(F, gg[i]));                                   \
            }                                                                                            \
            double a = 0.0, b = 0.0;                                                                     \
            for (int j = 0; j < SF_LANES; j++) {                                                         \
                a += l1[j];                                                                              \
                b += ip[j];                                                                              \
            }                                                                                            \
            part[2 * k] = a;                                                                             \
            part[2 * k + 1] = b;                                                                         \
        }                                                                                                \
        sf_add_parts(part, count, out, SF_SUM_GRAD_L1, SF_SUM_GRAD_Z_MINUS_Y);                           \
        free(part);                                                                                      \
        free(chunks);                                                                                    \
        return 0;                                                                                        \
    }

SF_SUMS_ENTRY(float, float, float)
SF_SUMS_ENTRY(double, double, double)
SF_SUMS_ENTRY(bfloat16, bf16, sf_bf16)
SF_SUMS_ENTRY(float16, f16, sf_f16)

/*
 * Low-bit state (schedule-free Adam with state_precision "bf16" or "8bit").
 *
 * sf_lowbit_step_<P>, for parameters (y, g) of P in float, bfloat16, float16:
 * z is bfloat16; v is bfloat16 (vformat SF_LB_BF16) or, with SF_LB_8BIT, the
 * square root s of v in 8-bit codes with one int8 exponent E per block of
 * SF_LB_BLOCK elements of a tensor. A code c = 16e + m stands for
 * q = (1 + m/16) 2^(e-15) (e >= 1) or m 2^-18 (e = 0), and s = q 2^E, with E
 * the smallest exponent that puts the block's largest s at or below
 * 1.9375 2^E. sfoptim/backends/lowbit.py states why, and is the same step in
 * torch operations, bit for bit: every operation below is one torch does in
 * float32, in the same order, and the random bits are the same hash.
 *
 * Per element, in float:
 *   v' = beta2 v + (1-beta2) g^2;  s = sqrt(v')
 *   d  = g / (s * (1/sqrt(bc2)) + eps) + wd*y     (SF_SGD_V: g + wd*y; no term with wd = 0)
 *   y <- lerp(y, z, c) + lr*(beta*(1-c) - 1)*d;  z <- z - lr*d
 * z and v' are rounded stochastically (bit 0 of `rounding`; to nearest
 * without), y to nearest or, for 16-bit parameters with bit 1, stochastically.
 * One hash per element (sf_lb_random, keyed by sf_key_for) serves both: its
 * high 16 bits round z, its low 16 bits (shifted up) round v.
 * The direction uses v' before it is rounded. Work goes block by block
 * through float arrays on the stack, so the block maximum of s is known
 * before its elements are coded; blocks never straddle chunks (SF_CHUNK is a
 * multiple of SF_LB_BLOCK).
 */
#define SF_LB_BLOCK 512
#define SF_LB_BF16 1
#define SF_LB_8BIT 2
#if SF_CHUNK % SF_LB_BLOCK
#error "SF_CHUNK must be a multiple of SF_LB_BLOCK"
#endif
/* 1.9375 * 2^64: larger square roots (whose square overflows float) and NaN are coded as this. */
#define SF_LB_SMAX 35740566642812256256.0f

/* Multiply, xorshift, multiply: x = (index + a) * odd, x ^= x >> 16, x * odd.
 * The key a is new at every step (it hashes the step's seed), so for each
 * element x is uniform over 32 bits from step to step, its high half (for z)
 * and low half (for v) independent of each other; the second multiply
 * leaves no correlation between the numbers of nearby elements within a
 * step (one multiply alone leaves correlations of up to 0.45 at lags of
 * 1 to 16 elements). Half the multiplies and a third of the shifts of sf_random. */
static inline uint32_t sf_lb_random(sf_key k, uint32_t index) {
    uint32_t x = (index + k.a) * 0x9e3779b1u;
    x ^= x >> 16;
    return x * 0x85ebca6bu;
}

/* sf_bf16_stochastic, with NaN replaced before the shift (the same bits). */
static inline sf_bf16 sf_lb_bf16_stochastic(float f, uint32_t rnd) {
    const uint32_t sum = sf_to_bits(f) + (rnd >> 16);
    return (sf_bf16)(sf_select(f != f, 0x7fc00000u, sum) >> 16);
}

static inline float sf_pow2(int32_t e) { return sf_from_bits((uint32_t)(e + 127) << 23); }

/* q of a code c (widened to 32 bits), with no branch and no select: t = c 2^19
 * in the bits of a float with the exponent moved by 112 is q for a normal
 * code (c >= 16) and (16 + c) 2^-19 > q = c 2^-18 for a subnormal one; with
 * the exponent moved by 113, less 2^-14, it is exactly q = c 2^-18 for a
 * subnormal code and 2q - 2^-14 >= q for a normal one. q is the smaller. */
static inline float sf_lb_decode(uint32_t c) {
    const uint32_t t = c << 19;
    const int32_t normal = (int32_t)(t + (112u << 23));
    const int32_t sub = (int32_t)sf_to_bits(sf_from_bits(t + (113u << 23)) - 6.103515625e-05f);
    return sf_from_bits((uint32_t)(normal < sub ? normal : sub));
}

/* The code of q in [0, 1.9375] rounded up with probability r / 2^19 of the gap
 * (r < 2^19): the bits of q above its 4 kept mantissa bits, with r added below
 * them. Below 2^-14 (subnormal codes, a fixed gap of 2^-18) the bits of
 * (q + 2^-14) / 2 (q to the nearest multiple of 2^-37, in a float of exponent
 * -15) give the subnormal code by the same formula; as signed integers they
 * are the larger of the two exactly when q < 2^-14 (and for q = -0). */
static inline uint32_t sf_lb_encode(float q, uint32_t r) {
    const int32_t lifted = (int32_t)(sf_to_bits(q + 6.103515625e-05f) - (1u << 23));
    const int32_t plain = (int32_t)sf_to_bits(q);
    const uint32_t u = (uint32_t)(lifted > plain ? lifted : plain);
    return ((u + r) >> 19) - 1792u; /* at most 255: q <= 1.9375 has no bits below the kept ones */
}

/* The exponent of a block whose largest (coded) square root is mx >= 0. */
static inline int32_t sf_lb_exponent(float mx) {
    int32_t e = mx > 0.0f ? (int32_t)(sf_to_bits(mx) >> 23) - 127 : 0;
    return e + (mx > sf_pow2(e) * 1.9375f);
}

/* The step's scalars in float, computed once per call (not per block: the
 * stores of codes, bytes, may alias anything, so they would not be hoisted). */
typedef struct {
    float c, lr, wd, ystep, b2, omb2, rsbc2, eps, omc;
    int upper, decay;
} sf_lb_consts;

static sf_lb_consts sf_lb_consts_of(const sf_scalars *s) {
    sf_lb_consts k;
    k.c = (float)s[SF_CKP1];
    k.lr = (float)s[SF_LR];
    k.wd = (float)s[SF_WD];
    k.ystep = (float)(s[SF_LR] * (s[SF_BETA] * (1.0 - s[SF_CKP1]) - 1.0));
    k.b2 = (float)s[SF_BETA2];
    k.omb2 = (float)(1.0 - s[SF_BETA2]);
    k.rsbc2 = (float)(1.0 / sqrt(s[SF_BC2]));
    k.eps = (float)s[SF_EPS];
    k.omc = (float)(1.0 - s[SF_CKP1]);
    k.upper = s[SF_CKP1] >= 0.5;
    k.decay = s[SF_WD] != 0.0;
    return k;
}

#define SF_LOWBIT_ENTRY(NAME, F, S)                                                                      \
    static inline __attribute__((always_inline)) void sf_lowbit_block_##NAME(                           \
        S *restrict y, const S *restrict g, sf_bf16 *restrict z, void *restrict vp, int8_t *restrict ex, \
        int64_t len, const sf_lb_consts *restrict k, const int mode, const int vformat, const int upper, \
        const int decay, const int rounding, const sf_key *keys, uint32_t at) {                          \
        float yb[SF_LB_BLOCK], zb[SF_LB_BLOCK], vb[SF_LB_BLOCK];                                        \
        const float lr = k->lr, wd = k->wd, ystep = k->ystep, b2 = k->b2, omb2 = k->omb2;                \
        const float rsbc2 = k->rsbc2, eps = k->eps;                                                      \
        /* torch's two-sided lerp as base + diff * w: z - diff (1-c) or y + diff c (negating is exact).  \
         * `upper` (c >= 0.5) and `decay` (wd != 0; without it d is left as it is) are constants where   \
         * ADAM calls this, so its loops select nothing for them; SGD_V (RAdam's first steps) selects. */ \
        const float w = upper ? -k->omc : k->c;                                                          \
        const int sr = rounding & 1, ysr = (rounding & 2) && SF_NARROW_##F;                             \
        const float scale = vformat == SF_LB_8BIT ? sf_pow2(ex[0]) : 1.0f;                              \
        const sf_bf16 *restrict v16 = (const sf_bf16 *)vp;                                              \
        const uint8_t *restrict v8 = (const uint8_t *)vp;                                               \
        /* int counters (len <= SF_LB_BLOCK): the hashed index stays in 32-bit lanes. */                \
        const int n = (int)len;                                                                         \
        float mx = 0.0f;                                                                                \
        if (vformat == SF_LB_8BIT) {                                                                     \
            /* The old v from the codes first, in a loop of its own: the step's loop then has no byte lanes. */ \
            _Pragma("omp simd")                                                                          \
            for (int i = 0; i < n; i++) {                                                                \
                const float so = sf_lb_decode(v8[i]) * scale;                                            \
                vb[i] = so * so;                                                                         \
            }                                                                                            \
        }                                                                                                \
        /* One pass: read, step, write y, keep z and v (or s, clamped) for rounding. */                 \
        _Pragma("omp simd reduction(max:mx)")                                                           \
        for (int i = 0; i < n; i++) {                                                             \
            const float yi = SF_LOAD_##F(y[i]), gi = SF_LOAD_##F(g[i]), zi = sf_bf16_load(z[i]);        \
            float vo;                                                                                   \
            if (vformat == SF_LB_BF16) {                                                                \
                vo = sf_bf16_load(v16[i]);                                                              \
            } else {                                                                                     \
                vo = vb[i];                                                                              \
            }                                                                                            \
            const float vi = b2 * vo + omb2 * gi * gi, si = sqrtf(vi);                                  \
            float d = mode == SF_ADAM ? gi / (si * rsbc2 + eps) : gi;                                   \
            d = SF_PICK_float(decay, d + wd * yi, d);                                                    \
            const float diff = zi - yi;                                                                 \
            const float lerped = SF_PICK_float(upper, zi, yi) + diff * w;                                \
            const float yn = lerped + ystep * d;                                                        \
            y[i] = SF_NEAR_##F(yn);                                                                     \
            if (SF_NARROW_##F) yb[i] = yn;                                                              \
            zb[i] = zi - lr * d;                                                                        \
            /* NaN and square roots above SF_LB_SMAX are coded as SF_LB_SMAX */                          \
            const float keep = vformat == SF_LB_BF16 ? vi : (si < SF_LB_SMAX ? si : SF_LB_SMAX);         \
            vb[i] = keep;                                                                               \
            mx = keep > mx ? keep : mx;                                                                 \
        }                                                                                                \
        if (ysr) {                                                                                      \
            _Pragma("omp simd")                                                                          \
            for (int i = 0; i < n; i++) y[i] = SF_SR_##F(yb[i], sf_lb_random(keys[SF_STREAM_Y], at + (uint32_t)i)); \
        }                                                                                                \
        float inv = 1.0f;                                                                                \
        if (vformat == SF_LB_8BIT) {                                                                     \
            const int32_t e = sf_lb_exponent(mx);                                                        \
            inv = sf_pow2(-e);                                                                           \
            ex[0] = (int8_t)e;                                                                           \
        }                                                                                                \
        sf_bf16 *restrict vw16 = (sf_bf16 *)vp;                                                          \
        uint8_t *restrict vw8 = (uint8_t *)vp;                                                           \
        /* The second pass rounds z and v: one hash per element, its high half for z, its low half for v. */ \
        if (sr) {                                                                                        \
            const sf_key kz = keys[SF_STREAM_Z];                                                         \
            _Pragma("omp simd")                                                                          \
            for (int i = 0; i < n; i++) {                                                                \
                const uint32_t r = sf_lb_random(kz, at + (uint32_t)i);                                   \
                z[i] = sf_lb_bf16_stochastic(zb[i], r);                                                  \
                if (vformat == SF_LB_BF16)                                                               \
                    vw16[i] = sf_bf16_stochastic(vb[i], r << 16);                                        \
                else                                                                                     \
                    vw8[i] = (uint8_t)sf_lb_encode(vb[i] * inv, (r & 0xffffu) << 3);                     \
            }                                                                                            \
        } else {                                                                                         \
            _Pragma("omp simd")                                                                          \
            for (int i = 0; i < n; i++) {                                                                \
                z[i] = sf_bf16_nearest(zb[i]);                                                           \
                if (vformat == SF_LB_BF16)                                                               \
                    vw16[i] = sf_bf16_nearest(vb[i]);                                                    \
                else                                                                                     \
                    vw8[i] = (uint8_t)sf_lb_encode(vb[i] * inv, 1u << 18);                               \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    int sf_lowbit_step_##NAME(int64_t n, S **y, S **g, sf_bf16 **z, void **v, int8_t **ex,              \
                              const int64_t *sizes, const sf_scalars *s, int mode, int vformat,          \
                              int rounding, uint64_t seed, int nthreads) {                               \
        int64_t count = 0;                                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                     \
        if (!chunks) return -1;                                                                          \
        const sf_lb_consts kc = sf_lb_consts_of(s);                                                      \
        int64_t total = 0;                                                                               \
        for (int64_t k = 0; k < count; k++) total += chunks[k].len;                                      \
        /* Each thread takes the chunks that start in its equal share of the elements, not an equal      \
         * number of chunks (a tensor's last chunk is shorter: 13 vectors of 8192 would otherwise all    \
         * fall to one thread). */                                                                       \
        _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")                                   \
        {                                                                                                \
        const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();                        \
        int64_t next = 0;                                                                                \
        for (int64_t k = 0; k < count; k++) {                                                            \
            const int64_t i = chunks[k].idx, o = chunks[k].start, len = chunks[k].len, first = next;     \
            next += len;                                                                                 \
            if (first * parts / total != part) continue;                                                 \
            sf_key keys[SF_STREAMS];                                                                     \
            for (int st = 0; st < SF_STREAMS; st++) keys[st] = sf_key_for(seed, st, i, o);               \
            const int64_t vsize = vformat == SF_LB_BF16 ? 2 : 1;                                         \
            char *vbase = (char *)v[i];                                                                  \
            for (int64_t b = 0; b < len; b += SF_LB_BLOCK) {                                             \
                const int64_t at = o + b, bl = len - b < SF_LB_BLOCK ? len - b : SF_LB_BLOCK;            \
                int8_t *eb = vformat == SF_LB_8BIT ? ex[i] + at / SF_LB_BLOCK : 0;                       \
                /* Constant family and format (and for ADAM lerp side and decay) at each call: each inlined \
                 * copy is one vector loop. */                                                           \
                if (mode == SF_SGD_V && vformat == SF_LB_BF16)                                           \
                    SF_LB_CALL(NAME, SF_SGD_V, SF_LB_BF16, kc.upper, kc.decay);                          \
                else if (mode == SF_SGD_V)                                                               \
                    SF_LB_CALL(NAME, SF_SGD_V, SF_LB_8BIT, kc.upper, kc.decay);                          \
                else if (vformat == SF_LB_BF16)                                                          \
                    SF_LB_CALLS(NAME, SF_ADAM, SF_LB_BF16);                                              \
                else                                                                                     \
                    SF_LB_CALLS(NAME, SF_ADAM, SF_LB_8BIT);                                              \
            }                                                                                            \
        }                                                                                                \
        }                                                                                                \
        free(chunks);                                                                                    \
        return 0;                                                                                        \
    }

#define SF_LB_CALL(NAME, MODE, FMT, UPPER, DECAY)                                                       \
    sf_lowbit_block_##NAME(y[i] + at, g[i] + at, z[i] + at, vbase + at * vsize, eb, bl, &kc, MODE, FMT, UPPER, \
                           DECAY, rounding, keys, (uint32_t)at)
#define SF_LB_CALLS(NAME, MODE, FMT)                                                                    \
    do {                                                                                                 \
        if (kc.upper && kc.decay)                                                                       \
            SF_LB_CALL(NAME, MODE, FMT, 1, 1);                                                          \
        else if (kc.upper)                                                                              \
            SF_LB_CALL(NAME, MODE, FMT, 1, 0);                                                          \
        else if (kc.decay)                                                                              \
            SF_LB_CALL(NAME, MODE, FMT, 0, 1);                                                          \
        else                                                                                            \
            SF_LB_CALL(NAME, MODE, FMT, 0, 0);                                                          \
    } while (0)
#define SF_NARROW_float 0
#define SF_NARROW_bf16 1
#define SF_NARROW_f16 1
SF_LOWBIT_ENTRY(float, float, float)
SF_LOWBIT_ENTRY(bfloat16, bf16, sf_bf16)
SF_LOWBIT_ENTRY(float16, f16, sf_f16)

/*
 * Schedule-free Prodigy (the family SF_PRODIGY), in entry points of its own:
 * its buffers v, s and p0 may be stored in another format B than the
 * parameter and z (format P), so every entry is written once per pair (P, B)
 * instantiated below, computed in double when P is double and in float
 * otherwise. Every element is widened when read and rounded once when
 * written, as everywhere above.
 *
 * sf_prodigy_sums_<P>_<B>: the two global sums of Prodigy's estimate in one
 * read of g, z, p0 and s, each term computed in the computing format (as the
 * foreach path does) and summed as described at SF_PLANES:
 *     out[SF_SUM_GRAD_P0_MINUS_Z] = sum g*(p0 - z)
 *     out[SF_SUM_DECAYED_L1]      = sum |rho*s + a*g|      (a = SF_ACCUM = d^2 gamma)
 *
 * sf_prodigy_step_<P>_<B>: with clip = s[SF_CLIP] > 0, first one read of g
 * and v for the sum of u^2 over each tensor (double, fixed order), which
 * gives each tensor its divisor max(1, RMS(u)/clip) (NaN stays NaN, as
 * torch's clamp_min leaves it); then one pass that reads
 * y, g, z, v, s and writes y, z, v, s:
 *     v' = beta2*v + d^2(1-beta2)*g*g        s' = rho*s + a*g
 *     u  = g / (sqrt(v') + d'*eps) * (d' / divisor)   (the divisor of the tensor: 1 unclipped)
 *     y <- lerp(y, z, c) + lr*(beta*(1-c) - 1)*(u + wd*y);   z <- z - lr*(u + wd*y)
 * (with wdz nonzero, wdz*z in place of wd*y)
 * with d = SF_D (the estimate v accumulates with) and d' = SF_D_NEW (the new
 * one, which needs the sums of every bucket first). The update of u needs v'
 * and d', so the clip cannot share the sums' pass. Everything that can fail
 * (the work lists) is allocated before the first write: a call that returns
 * -1 has changed nothing. With `stochastic` every narrow store rounds
 * stochastically (streams: y, z, v, and s on the m stream).
 */
/* Sums of Prodigy's passes: SF_PLANES running sums in the computing format over
 * blocks of SF_PBLOCK elements (16 terms each), added into as many double
 * sums after every block; the tail of a chunk goes to lane 0 in double. As
 * for sf_sums_<T>, the order depends on the data only. */
#define SF_PLANES 16
#define SF_PBLOCK 256

#define SF_PRODIGY_ENTRIES(NAME, P, PF, B, BF, T, SQRT)                                                  \
    static inline __attribute__((always_inline)) T sf_prodigy_u_##NAME(T gi, T vi, T epsd, T dn,       \
                                                                        T *vnew, const T b2, const T vscale) { \
        *vnew = b2 * vi + vscale * gi * gi;                                                              \
        return gi / (SQRT(*vnew) + epsd) * dn;                                                           \
    }                                                                                                    \
    static inline __attribute__((always_inline)) void sf_prodigy_span_##NAME(                           \
        P *restrict y, const P *restrict g, P *restrict z, B *restrict v, B *restrict sv, int64_t n,     \
        const sf_scalars *s, const double factor, const int sr, const sf_key *keys, uint32_t base) {     \
        const int atz = s[SF_WDZ] != 0.0; /* decay at z (wdz) instead of at y (wd) */                  \
        const T c = (T)s[SF_CKP1], lr = (T)s[SF_LR], wd = (T)(atz ? s[SF_WDZ] : s[SF_WD]);               \
        const T ystep = (T)(s[SF_LR] * (s[SF_BETA] * (1.0 - s[SF_CKP1]) - 1.0));                         \
        const T b2 = (T)s[SF_BETA2], vscale = (T)(s[SF_D] * s[SF_D] * (1.0 - s[SF_BETA2]));              \
        const T rho = (T)s[SF_RHO], acc = (T)s[SF_ACCUM], dn = (T)(s[SF_D_NEW] / factor);                \
        const T epsd = (T)(s[SF_D_NEW] * s[SF_EPS]);                                                     \
        const int upper = s[SF_CKP1] >= 0.5;                                                             \
        const T omc = (T)(1.0 - s[SF_CKP1]);                                                             \
        _Pragma("omp simd")                                                                              \
        for (int64_t i = 0; i < n; i++) {                                                                \
            const T yi = SF_LOAD_##PF(y[i]), gi = SF_LOAD_##PF(g[i]), zi = SF_LOAD_##PF(z[i]);           \
            T vi;                                                                                        \
            const T u = sf_prodigy_u_##NAME(gi, SF_LOAD_##BF(v[i]), epsd, dn, &vi, b2, vscale);          \
            const T si = SF_LOAD_##BF(sv[i]) * rho + acc * gi;                                           \
            const T d = u + wd * SF_PICK_##T(atz, zi, yi);                                               \
            const T diff = zi - yi;                                                                      \
            const T from_z = zi - diff * omc, from_y = yi + c * diff;           \
            const T yn = SF_PICK_##T(upper, from_z, from_y) + ystep * d, zn = zi - lr * d;               \
            if (sr) {                                                                                    \
                const uint32_t at = base + (uint32_t)i;                                                  \
                (void)at;                                                                                \
                y[i] = SF_SR_##PF(yn, sf_random(keys[SF_STREAM_Y], at));                                 \
                z[i] = SF_SR_##PF(zn, sf_random(keys[SF_STREAM_Z], at));                                 \
                v[i] = SF_SR_##BF(vi, sf_random(keys[SF_STREAM_V], at));                                 \
                sv[i] = SF_SR_##BF(si, sf_random(keys[SF_STREAM_M], at));                                \
            } else {                                                                                     \
                y[i] = SF_NEAR_##PF(yn);                                                                 \
                z[i] = SF_NEAR_##PF(zn);                                                                 \
                v[i] = SF_NEAR_##BF(vi);                                                                 \
                sv[i] = SF_NEAR_##BF(si);                                                                \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    int sf_prodigy_step_##NAME(int64_t n, P **y, P **g, P **z, B **v, B **sv, const int64_t *sizes,     \
                               const sf_scalars *s, int stochastic, uint64_t seed, int nthreads) {       \
        int64_t count = 0;                                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                     \
        if (!chunks) return -1;                                                                          \
        const double clip = s[SF_CLIP];                                                                  \
        double *factor = NULL, *part = NULL;                                                             \
        if (clip > 0.0) {                                                                                \
            factor = (double *)malloc((size_t)(n > 0 ? n : 1) * sizeof(double));                         \
            part = (double *)malloc((size_t)(count > 0 ? count : 1) * sizeof(double));                   \
            if (!factor || !part) {                                                                      \
                free(factor);                                                                            \
                free(part);                                                                              \
                free(chunks);                                                                            \
                return -1;                                                                               \
            }                                                                                            \
        }                                                                                                \
        const T b2 = (T)s[SF_BETA2], vscale = (T)(s[SF_D] * s[SF_D] * (1.0 - s[SF_BETA2]));              \
        const T dn = (T)s[SF_D_NEW], epsd = (T)(s[SF_D_NEW] * s[SF_EPS]);                                \
        /* One parallel region: the clip's sums, their total per tensor (one thread), the update. */     \
        _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")                                   \
        {                                                                                                \
            if (part) {                                                                                  \
                _Pragma("omp for schedule(static)")                                                      \
                for (int64_t k = 0; k < count; k++) {                                                    \
                    const int64_t idx = chunks[k].idx, o = chunks[k].start, len = chunks[k].len;         \
                    const P *restrict gg = g[idx] + o;                                                   \
                    const B *restrict vv = v[idx] + o;                                                   \
                    double sq[SF_PLANES] = {0};                                                          \
                    int64_t i = 0;                                                                       \
                    for (; i + SF_PBLOCK <= len; i += SF_PBLOCK) {                                       \
                        T blk[SF_PLANES] = {0};                                                          \
                        for (int r = 0; r < SF_PBLOCK; r += SF_PLANES) {                                 \
                            _Pragma("omp simd")                                                          \
                            for (int j = 0; j < SF_PLANES; j++) {                                        \
                                T vn;                                                                    \
                                const T u = sf_prodigy_u_##NAME(SF_LOAD_##PF(gg[i + r + j]),             \
                                                                SF_LOAD_##BF(vv[i + r + j]), epsd, dn, &vn, b2, vscale); \
                                blk[j] += u * u;                                                         \
                            }                                                                            \
                        }                                                                                \
                        for (int j = 0; j < SF_PLANES; j++) sq[j] += (double)blk[j];                     \
                    }                                                                                    \
                    for (; i < len; i++) {                                                               \
                        T vn;                                                                            \
                        const double u = (double)sf_prodigy_u_##NAME(SF_LOAD_##PF(gg[i]), SF_LOAD_##BF(vv[i]), \
                                                                     epsd, dn, &vn, b2, vscale);         \
                        sq[0] += u * u;                                                                  \
                    }                                                                                    \
                    double t = 0.0;                                                                      \
                    for (int j = 0; j < SF_PLANES; j++) t += sq[j];                                      \
                    part[k] = t;                                                                         \
                }                                                                                        \
                _Pragma("omp single")                                                                    \
                {                                                                                        \
                    for (int64_t i = 0; i < n; i++) factor[i] = 0.0;                                     \
                    for (int64_t k = 0; k < count; k++) factor[chunks[k].idx] += part[k];                \
                    for (int64_t i = 0; i < n; i++) {                                                    \
                        const double q = sizes[i] > 0 ? sqrt(factor[i]) / (clip * sqrt((double)sizes[i])) : 1.0; \
                        factor[i] = q < 1.0 ? 1.0 : q; /* NaN stays NaN, as torch's clamp_min */        \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            _Pragma("omp for schedule(static)")                                                          \
            for (int64_t k = 0; k < count; k++) {                                                        \
                const int64_t i = chunks[k].idx, o = chunks[k].start, len = chunks[k].len;              \
                P *yy = y[i] + o, *zz = z[i] + o;                                                        \
                const P *gg = g[i] + o;                                                                  \
                B *vv = v[i] + o, *ss = sv[i] + o;                                                       \
                const double f = factor != NULL ? factor[i] : 1.0;                                       \
                sf_key keys[SF_STREAMS] = {{0, 0}};                                                      \
                if (stochastic) {                                                                        \
                    for (int st = 0; st < SF_STREAMS; st++) keys[st] = sf_key_for(seed, st, i, o);       \
                    sf_prodigy_span_##NAME(yy, gg, zz, vv, ss, len, s, f, 1, keys, (uint32_t)o);         \
                } else {                                                                                 \
                    sf_prodigy_span_##NAME(yy, gg, zz, vv, ss, len, s, f, 0, keys, (uint32_t)o);         \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        free(part);                                                                                      \
        free(factor);                                                                                    \
        free(chunks);                                                                                    \
        return 0;                                                                                        \
    }                                                                                                    \
    int sf_prodigy_sums_##NAME(int64_t n, P **g, P **z, B **p0, B **sv, const int64_t *sizes,           \
                               const sf_scalars *s, double *out, int nthreads) {                         \
        int64_t count = 0;                                                                               \
        sf_chunk *chunks = make_chunks(n, sizes, &count, &nthreads);                                     \
        if (!chunks) return -1;                                                                          \
        double *part = (double *)malloc((size_t)(count > 0 ? count : 1) * 2 * sizeof(double));           \
        if (!part) {                                                                                     \
            free(chunks);                                                                                \
            return -1;                                                                                   \
        }                                                                                                \
        const double rho = s[SF_RHO], acc = s[SF_ACCUM];                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")              \
        for (int64_t k = 0; k < count; k++) {                                                            \
            const int64_t idx = chunks[k].idx, o = chunks[k].start, len = chunks[k].len;                 \
            const P *restrict gg = g[idx] + o, *restrict zz = z[idx] + o;                                \
            const B *restrict pp = p0[idx] + o, *restrict ss = sv[idx] + o;                              \
            const T trho = (T)rho, tacc = (T)acc;                                                        \
            double gap[SF_PLANES] = {0}, l1[SF_PLANES] = {0};                                            \
            int64_t i = 0;                                                                               \
            for (; i + SF_PBLOCK <= len; i += SF_PBLOCK) {                                               \
                T bgap[SF_PLANES] = {0}, bl1[SF_PLANES] = {0};                                           \
                for (int r = 0; r < SF_PBLOCK; r += SF_PLANES) {                                         \
                    _Pragma("omp simd")                                                                  \
                    for (int j = 0; j < SF_PLANES; j++) {                                                \
                        const T gj = SF_LOAD_##PF(gg[i + r + j]);                                        \
                        bgap[j] += gj * (SF_LOAD_##BF(pp[i + r + j]) - SF_LOAD_##PF(zz[i + r + j]));     \
                        const T t = SF_LOAD_##BF(ss[i + r + j]) * trho + tacc * gj;                      \
                        bl1[j] += SF_PICK_##T(t < 0, -t, t);                                             \
                    }                                                                                    \
                }                                                                                        \
                for (int j = 0; j < SF_PLANES; j++) {                                                    \
                    gap[j] += (double)bgap[j];                                                           \
                    l1[j] += (double)bl1[j];                                                             \
                }                                                                                        \
            }                                                                                            \
            for (; i < len; i++) {                                                                       \
                const T gi = SF_LOAD_##PF(gg[i]);                                                        \
                gap[0] += (double)(gi * (SF_LOAD_##BF(pp[i]) - SF_LOAD_##PF(zz[i])));                     \
                l1[0] += fabs((double)(SF_LOAD_##BF(ss[i]) * trho + tacc * gi));                         \
            }                                                                                            \
            double a = 0.0, b = 0.0;                                                                     \
            for (int j = 0; j < SF_PLANES; j++) {                                                        \
                a += gap[j];                                                                             \
                b += l1[j];                                                                              \
            }                                                                                            \
            part[2 * k] = a;                                                                             \
            part[2 * k + 1] = b;                                                                         \
        }                                                                                                \
        sf_add_parts(part, count, out, SF_SUM_GRAD_P0_MINUS_Z, SF_SUM_DECAYED_L1);                       \
        free(part);                                                                                      \
        free(chunks);                                                                                    \
        return 0;                                                                                        \
    }

/* The (parameter, buffer) pairs: one format for both, or float32 with 16-bit buffers, or 16-bit with float32. */
SF_PRODIGY_ENTRIES(float_float, float, float, float, float, float, sqrtf)
SF_PRODIGY_ENTRIES(double_double, double, double, double, double, double, sqrt)
SF_PRODIGY_ENTRIES(bfloat16_bfloat16, sf_bf16, bf16, sf_bf16, bf16, float, sqrtf)
SF_PRODIGY_ENTRIES(float16_float16, sf_f16, f16, sf_f16, f16, float, sqrtf)
SF_PRODIGY_ENTRIES(float_bfloat16, float, float, sf_bf16, bf16, float, sqrtf)
SF_PRODIGY_ENTRIES(float_float16, float, float, sf_f16, f16, float, sqrtf)
SF_PRODIGY_ENTRIES(bfloat16_float, sf_bf16, bf16, float, float, float, sqrtf)
SF_PRODIGY_ENTRIES(float16_float, sf_f16, f16, float, float, float, sqrtf)

/* Lets the loader check that the library it found is the one it built. */
int sf_abi_version(void) { return SF_ABI_VERSION; }
