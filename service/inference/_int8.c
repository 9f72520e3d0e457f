/* The service's own int8 linear layer for AVX512-VNNI CPUs: y = x @ (W * s)^T + bias.
 *
 * Why it exists, when it runs and what it measured: service/inference/int8kernel.py.
 *
 * W is the int8 weight (one float scale per output channel) packed in the
 * order the kernel reads it (int8kernel.pack): K in passes of KP bytes; in a
 * pass, blocks of four output channels, each holding its four rows' first
 * 64 bytes, then their next 64, and so on. So W streams in address order
 * (the plain layout, four rows read side by side, measured 1.7x slower at
 * K = 1536), and a pass's activation bytes stay in L1 while the blocks go by
 * (one pass over K = 8960 at four rows measured 2x slower). K is padded to 64
 * with zeros, N to 4.
 *
 * Each call quantises the activation rows, each with its own symmetric scale
 * (x ~ sx * q, q in [-127, 127]), and stores q + 128: vpdpbusd multiplies
 * unsigned bytes by signed ones, and the 128 * rowsum(W) this adds is taken
 * off again with `corr` (per output channel, computed at packing). The sums
 * are exact in int32 (|(q + 128) w| <= 255 * 128, K < 2^16).
 *
 * Rows go four at a time, each 64-byte slice of a block loaded once for
 * them; a block's four accumulators per row are folded into one vector of
 * four sums at the end of a pass, and carried in `sums` between passes.
 *
 * Every function that uses AVX-512 carries its own target attribute, so the
 * file compiles with any x86-64 compiler flags; `vnni()` tells the caller
 * whether this CPU (and its OS) can run them.
 */
#define PY_SSIZE_T_CLEAN
#define Py_LIMITED_API 0x030b0000 /* the stable ABI of 3.11: one wheel (cp311-abi3) for the server's Python and later */
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#define INLINE static inline __attribute__((always_inline))
#ifndef PF
#define PF 4096
#endif
#ifndef WORK
#define WORK (256 << 10)
#endif
#define MC 64 /* activation rows per sweep over W when there are many (prefill) */
#ifndef KP
#define KP 2048 /* bytes of K per pass: four rows' slices of it (8 KiB) stay in L1 while the next block streams */
#endif

/* Rows [0, M) of x ([M, K] floats) as q + 128 bytes (row stride Kp, the padding 128s) and their scales. */
TARGET static void quantize(const float *x, long M, long K, long Kp, uint8_t *q, float *scale)
{
    for (long m = 0; m < M; m++) {
        const float *row = x + m * K;
        __m512 top = _mm512_setzero_ps();
        long k = 0;
        for (; k + 16 <= K; k += 16)
            top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        if (k < K)
            top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps((__mmask16)((1u << (K - k)) - 1), row + k)));
        float amax = _mm512_reduce_max_ps(top);
        scale[m] = amax / 127.0f;
        __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m512i offset = _mm512_set1_epi32(128);
        uint8_t *out = q + m * Kp;
        for (k = 0; k < K; k += 16) {
            __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + k), inv));
            _mm_mask_storeu_epi8(out + k, mask, _mm512_cvtepi32_epi8(_mm512_add_epi32(v, offset)));
        }
        memset(out + K, 128, Kp - K);
    }
}

/* The four sums of four int32 vectors. */
TARGET INLINE __m128i fold4(__m512i a, __m512i b, __m512i c, __m512i d)
{
    __m256i a2 = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    __m256i b2 = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64(b, 1));
    __m256i c2 = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
    __m256i d2 = _mm256_add_epi32(_mm512_castsi512_si256(d), _mm512_extracti64x4_epi64(d, 1));
    __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a2, b2), _mm256_hadd_epi32(c2, d2));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* Where one pass of the blocks over K goes: bytes [k0, k1) of each row; `sums` (row stride `ld`) carries the
 * int32 sums between passes; the first pass starts them, the last turns them into y. */
struct pass {
    long k0, k1, ld;
    int32_t *sums;
    int first, last;
    int prefetch; /* several row groups per block: fetch W ahead, so the arithmetic and the reads overlap */
};

/* The four channels of one block of P for rows [0, MB) of q over one pass. MB is a constant at each call, so
 * the loops unroll and the 4 * MB accumulators stay in registers (no spills: checked with objdump). */
TARGET INLINE void block(const int8_t *P, long Kp, long n, const uint8_t *q, const float *sx, int MB,
                         const int32_t *corr, const float *sw, const float *bias, float *y, long N,
                         const struct pass *pass, int32_t *sums)
{
    __m512i acc[4][4];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < 4; r++)
            acc[m][r] = _mm512_setzero_si512();
    /* the pass's part of W is one run of bytes, its blocks one after the other, each read in order */
    const int8_t *w = P + pass->k0 * pass->ld + n * (pass->k1 - pass->k0);
    for (long k = pass->k0; k < pass->k1; k += 64, w += 256) {
        if (PF && pass->prefetch)
            for (int line = 0; line < 256; line += 64)
                _mm_prefetch((const char *)w + PF + line, _MM_HINT_T0);
        __m512i w0 = _mm512_load_si512(w), w1 = _mm512_load_si512(w + 64);
        __m512i w2 = _mm512_load_si512(w + 128), w3 = _mm512_load_si512(w + 192);
        for (int m = 0; m < MB; m++) {
            __m512i xv = _mm512_load_si512(q + m * Kp + k);
            acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], xv, w0);
            acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], xv, w1);
            acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], xv, w2);
            acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], xv, w3);
        }
    }
    __mmask8 lanes = N - n >= 4 ? 0xf : (__mmask8)((1u << (N - n)) - 1); /* the padded channels are not written */
    __m128i c = _mm_load_si128((const __m128i *)(corr + n));
    __m128 s = _mm_load_ps(sw + n), b = _mm_load_ps(bias + n);
    for (int m = 0; m < MB; m++) {
        __m128i sum = fold4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
        __m128i *carried = (__m128i *)(sums + m * pass->ld + n);
        if (!pass->first)
            sum = _mm_add_epi32(sum, _mm_load_si128(carried));
        if (!pass->last) {
            _mm_store_si128(carried, sum);
            continue;
        }
        __m128 v = _mm_cvtepi32_ps(_mm_sub_epi32(sum, c));
        _mm_mask_storeu_ps(y + m * N + n, lanes, _mm_fmadd_ps(v, _mm_mul_ps(s, _mm_set1_ps(sx[m])), b));
    }
}

/* One block of channels for rows [0, M) of q over one pass, four rows at a time (16 accumulators and the
 * loads fit the 32 registers; six rows spilled and measured slower). */
TARGET INLINE void channels(const int8_t *P, long Kp, long n, const uint8_t *q, const float *sx, long M,
                            const int32_t *corr, const float *sw, const float *bias, float *y, long N,
                            const struct pass *pass)
{
    long m = 0;
    for (; m + 4 <= M; m += 4)
        block(P, Kp, n, q + m * Kp, sx + m, 4, corr, sw, bias, y + m * N, N, pass, pass->sums + m * pass->ld);
    const uint8_t *qm = q + m * Kp;
    float *ym = y + m * N;
    int32_t *sm = pass->sums + m * pass->ld;
    switch (M - m) {
    case 3: block(P, Kp, n, qm, sx + m, 3, corr, sw, bias, ym, N, pass, sm); break;
    case 2: block(P, Kp, n, qm, sx + m, 2, corr, sw, bias, ym, N, pass, sm); break;
    case 1: block(P, Kp, n, qm, sx + m, 1, corr, sw, bias, ym, N, pass, sm); break;
    }
}

/* y[M, N] = x[M, K] @ (W * sw)^T + bias, with W packed as P (see int8kernel.py: pack). `sums` holds
 * MC x N4 int32 when K is longer than one pass. */
TARGET static void linear(const float *x, long M, long K, const int8_t *P, long N, long Kp, const int32_t *corr,
                          const float *sw, const float *bias, float *y, int threads, uint8_t *q, float *sx,
                          int32_t *sums)
{
    quantize(x, M, K, Kp, q, sx);
    long blocks = (N + 3) / 4, passes = (Kp + KP - 1) / KP;
    long work = (long)blocks * 4 * Kp * (M < 4 ? 1 : M / 4); /* bytes of W read, times the row groups */
    if (threads > work / WORK)
        threads = work / WORK > 1 ? (int)(work / WORK) : 1; /* waking a thread costs more than a small layer */
    for (long m0 = 0; m0 < M; m0 += MC) { /* many rows: MC at a time */
        long mc = M - m0 < MC ? M - m0 : MC;
#pragma omp parallel num_threads(threads) if (threads > 1)
        for (long p = 0; p < passes; p++) {
            struct pass pass = {p * KP, (p + 1) * KP < Kp ? (p + 1) * KP : Kp, 4 * blocks, sums, p == 0,
                                p == passes - 1, mc > 4};
            /* static: each thread gets the same blocks in every pass, so it alone carries their sums */
#pragma omp for schedule(static) nowait
            for (long i = 0; i < blocks; i++)
                channels(P, Kp, 4 * i, q + m0 * Kp, sx + m0, mc, corr, sw, bias, y + m0 * N, N, &pass);
        }
    }
}

/* ---- the CPython side: pointers and sizes in, nothing allocated by Python per call ---- */

static int has_vnni; /* set once, at import */

static int vnni_ok(void)
{
    __builtin_cpu_init(); /* libgcc's check includes the OS saving the AVX-512 state (XGETBV) */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

static PyObject *py_vnni(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(has_vnni);
}

static PyObject *py_openmp(PyObject *self, PyObject *unused)
{
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

/* linear(x, y, p, corr, scales, bias, M, N, K, threads): pointers as ints; x is [M, K] float32, y [M, N]; p the
 * packed weight, 64-byte aligned; corr, scales and bias padded to a multiple of 4 channels. */
static PyObject *py_linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "linear takes 10 arguments");
        return NULL;
    }
    void *p[6];
    for (int i = 0; i < 6; i++)
        p[i] = PyLong_AsVoidPtr(args[i]);
    long M = PyLong_AsLong(args[6]), N = PyLong_AsLong(args[7]), K = PyLong_AsLong(args[8]);
    int threads = (int)PyLong_AsLong(args[9]);
    if (PyErr_Occurred())
        return NULL;
    if (M < 1 || N < 1 || K < 1 || K >= 65536 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "linear: M, N, threads >= 1 and 1 <= K < 65536");
        return NULL;
    }
    if (!has_vnni) {
        PyErr_SetString(PyExc_RuntimeError, "linear: this CPU lacks AVX512-VNNI");
        return NULL;
    }
    long Kp = (K + 63) / 64 * 64;
    if (((uintptr_t)p[2] & 63) || ((uintptr_t)p[3] & 15) || ((uintptr_t)p[4] & 15) || ((uintptr_t)p[5] & 15)) {
        PyErr_SetString(PyExc_ValueError, "linear: the packed weight must be 64-byte aligned, the vectors 16");
        return NULL;
    }
    _Alignas(64) uint8_t stack_q[8 * 9216];
    float stack_s[MC];
    size_t bytes = (size_t)M * Kp, sum_bytes = Kp > KP ? (size_t)(M < MC ? M : MC) * ((N + 3) / 4 * 16) : 0;
    uint8_t *q = bytes <= sizeof stack_q ? stack_q : aligned_alloc(64, (bytes + 63) / 64 * 64);
    float *sx = M <= MC ? stack_s : malloc(M * sizeof(float));
    int32_t *sums = sum_bytes ? aligned_alloc(64, (sum_bytes + 63) / 64 * 64) : NULL;
    if (!q || !sx || (sum_bytes && !sums)) {
        if (q != stack_q) free(q);
        if (sx != stack_s) free(sx);
        free(sums);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    linear(p[0], M, K, p[2], N, Kp, p[3], p[4], p[5], p[1], threads, q, sx, sums);
    Py_END_ALLOW_THREADS
    if (q != stack_q) free(q);
    if (sx != stack_s) free(sx);
    free(sums);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_FASTCALL,
     "linear(x, y, p, corr, scales, bias, M, N, K, threads): y = x @ (w * scales)^T + bias (pointers as ints)."},
    {"vnni", py_vnni, METH_NOARGS, "Whether this CPU and OS run the kernel (AVX512 F, BW, VL and VNNI)."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the kernel was built with OpenMP threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int8", "The own int8 linear kernel (AVX512-VNNI).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__int8(void)
{
    has_vnni = vnni_ok();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "KP", KP) < 0) { /* int8kernel.pack must pack in the same passes */
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
