/* Single-pass CPU kernels for funcopt's *pure* optimizer steps (see funcopt/native.py).
 *
 * torch's fused optimizer kernels only update their buffers in place, so a pure step built on
 * them must first copy the state it may not overwrite. These kernels read the old buffers and
 * write the results into separate, freshly allocated ones in one pass. Every kernel works on a
 * list of tensors at once: `ptrs` holds NARRAYS pointers per tensor (tensor k's arrays at
 * ptrs[k * narrays + a]), `sizes[k]` its number of elements. The work is cut into chunks of
 * CHUNK elements across all tensors and shared among OpenMP threads (torch's own libgomp when
 * loaded into a process that has imported torch). Large outputs are written with
 * non-temporal stores, which skip the read-for-ownership of fresh memory.
 *
 * The arithmetic follows torch's fused CPU kernels (`torch._fused_adam_`, `_fused_sgd_`) with
 * the hyperparameters cast to the element type first, so the numbers agree with the in-place
 * fast path to float rounding. Built by funcopt/native.py with -O3 -march=native -fopenmp
 * -ffp-contract=off; needs AVX2.
 */
#define _GNU_SOURCE /* MADV_HUGEPAGE */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#ifndef __AVX2__
#error "funcopt's native kernels need AVX2"
#endif

#define CHUNK 32768 /* elements; a multiple of every vector width, so chunks stay aligned */

/* ---- vector helpers: F* for float (8 lanes), D* for double (4 lanes) ------------------- */
#define F_T __m256
#define F_W 8
#define F_SET1 _mm256_set1_ps
#define F_LOAD _mm256_loadu_ps
#define F_ADD _mm256_add_ps
#define F_SUB _mm256_sub_ps
#define F_MUL _mm256_mul_ps
#define F_DIV _mm256_div_ps
#define F_SQRT _mm256_sqrt_ps
#define F_MAX _mm256_max_ps
#define F_FMA _mm256_fmadd_ps
#define F_STREAM _mm256_stream_ps
#define F_STOREU _mm256_storeu_ps

#define D_T __m256d
#define D_W 4
#define D_SET1 _mm256_set1_pd
#define D_LOAD _mm256_loadu_pd
#define D_ADD _mm256_add_pd
#define D_SUB _mm256_sub_pd
#define D_MUL _mm256_mul_pd
#define D_DIV _mm256_div_pd
#define D_SQRT _mm256_sqrt_pd
#define D_MAX _mm256_max_pd
#define D_FMA _mm256_fmadd_pd
#define D_STREAM _mm256_stream_pd
#define D_STOREU _mm256_storeu_pd

/* Store a vector: streaming when `nt` (the address is then 32-byte aligned), plain otherwise. */
#define STORE(P, dst, v, nt)                                                                \
  do {                                                                                         \
    if (nt) P##_STREAM((dst), (v));                                                           \
    else P##_STOREU((dst), (v));                                                              \
  } while (0)

/* Hyperparameters as passed from Python (doubles; cast to the element type in each kernel). */
typedef struct {
  double b2, w1, w2;         /* m' = lerp(m, g, w1), v' = v*b2 + w2*g*g (torch's fused form) */
  double step_size;          /* lr / (1 - b1^t) */
  double bc2_sqrt, eps;      /* denom = sqrt(v') / bc2_sqrt + eps */
  double weight_decay;       /* L2: g += weight_decay * p */
  double lr_wd;              /* decoupled (AdamW): lr * weight_decay */
  int64_t maximize, l2, decoupled, amsgrad, write_params, nontemporal;
} adam_args;

typedef struct {
  double lr, momentum, dampening, weight_decay;
  int64_t has_buf, first, nesterov, maximize, l2, write_params, nontemporal;
} sgd_args;

typedef struct {
  int64_t nontemporal;
} add_args;

/* Chunk bookkeeping shared by every kernel: the prefix sums of chunks per tensor. */
static int64_t *chunk_starts(int64_t ntensors, const int64_t *sizes) {
  int64_t *start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(ntensors + 1));
  if (!start) return 0;
  start[0] = 0;
  for (int64_t k = 0; k < ntensors; k++) start[k + 1] = start[k] + (sizes[k] + CHUNK - 1) / CHUNK;
  return start;
}

/* Whether every output pointer of a range is 32-byte aligned at `lo` (fresh torch tensors are
 * 64-byte aligned, so this holds for every chunk of them). */
static int aligned32(void *const *outs, int nouts, int64_t lo, int64_t elem) {
  for (int i = 0; i < nouts; i++)
    if (outs[i] && (((uintptr_t)outs[i] + (uintptr_t)(lo * elem)) & 31)) return 0;
  return 1;
}

/* Fresh outputs of at least HUGE_BYTES are blocks glibc serves with a new mmap (its largest
 * threshold is 32 MiB), not yet touched: asks the kernel to back their 2 MiB-aligned interior
 * with transparent huge pages, so that the first write faults once per 2 MiB instead of once
 * per 4 KiB (a fresh 64 MiB tensor otherwise costs 16k page faults, more than the
 * arithmetic). Smaller blocks usually come from the heap, which is left alone. Only a hint:
 * with THP off ("never") nothing changes. */
#define HUGE_BYTES (32 << 20)
static void advise_huge(void *const *a, int64_t ntensors, int narrays, int first_out,
                        const int64_t *sizes, int64_t elem) {
#ifdef MADV_HUGEPAGE
  const uintptr_t huge = (uintptr_t)2 << 20;
  for (int64_t k = 0; k < ntensors; k++) {
    const uintptr_t bytes = (uintptr_t)(sizes[k] * elem);
    if (bytes < HUGE_BYTES) continue;
    for (int i = first_out; i < narrays; i++) {
      const uintptr_t p = (uintptr_t)a[k * narrays + i];
      if (!p) continue;
      const uintptr_t lo = (p + huge - 1) & ~(huge - 1), hi = (p + bytes) & ~(huge - 1);
      if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    }
  }
#else
  (void)a; (void)ntensors; (void)narrays; (void)first_out; (void)sizes; (void)elem;
#endif
}

/* Defines the exported kernel NAME(ntensors, ptrs, sizes, args, nthreads): NAME##_range over
 * every chunk of every tensor, shared among `nthreads` OpenMP threads, after advise_huge on
 * the outputs (the arrays from FIRST_OUT on). Returns 0, or -1 if out of memory. */
#define ENTRY(NAME, T, NARRAYS, FIRST_OUT)                                                     \
  int NAME(int64_t ntensors, void **ptrs, const int64_t *sizes, const void *args, int nthreads) { \
    T **a = (T **)ptrs;                                                                        \
    int64_t *start = chunk_starts(ntensors, sizes);                                            \
    if (!start) return -1;                                                                     \
    advise_huge((void *const *)a, ntensors, NARRAYS, FIRST_OUT, sizes, (int64_t)sizeof(T));    \
    const int64_t total = start[ntensors];                                                     \
    _Pragma("omp parallel num_threads(nthreads)") {                                            \
      int64_t k = 0;                                                                           \
      _Pragma("omp for schedule(static)") for (int64_t c = 0; c < total; c++) {                \
        while (start[k + 1] <= c) k++; /* each thread's chunks ascend */                       \
        const int64_t lo = (c - start[k]) * CHUNK;                                             \
        const int64_t hi = lo + CHUNK < sizes[k] ? lo + CHUNK : sizes[k];                      \
        NAME##_range(a + NARRAYS * k, lo, hi, args);                                           \
      }                                                                                        \
      _mm_sfence(); /* order this thread's streaming stores before returning */                \
    }                                                                                          \
    free(start);                                                                               \
    return 0;                                                                                  \
  }

/* ---- Adam / AdamW -------------------------------------------------------------------------
 * arrays per tensor (9): g, m, v, vmax, p, out, m_out, v_out, vmax_out. vmax/vmax_out are used
 * with amsgrad, p with L2 or decoupled decay or write_params. `out` receives the update
 * (-step_size * m' / denom, minus lr*wd*p when decoupled) or, with write_params, the new
 * params (p - step_size * m' / denom, p scaled by 1 - lr*wd first when decoupled). */
#define ADAM_KERNEL(NAME, T, P)                                                                \
  static void NAME##_range(T *const *a, int64_t lo, int64_t hi, const void *args) {            \
    const adam_args *h = (const adam_args *)args;                                              \
    const T *g = a[0], *m = a[1], *v = a[2], *vmax = a[3], *p = a[4];                          \
    T *out = a[5], *mo = a[6], *vo = a[7], *vmaxo = a[8];                                      \
    const T b2 = (T)h->b2, w1 = (T)h->w1, w2 = (T)h->w2;                                       \
    const int small = fabs((double)w1) < 0.5; /* torch's lerp: from m if the weight is small */ \
    const T ss = (T)h->step_size, bc = (T)h->bc2_sqrt, eps = (T)h->eps;                        \
    const T wd = (T)h->weight_decay, keep = (T)(1.0 - h->lr_wd), nlrwd = (T)(-h->lr_wd);       \
    void *outs[4] = {out, mo, vo, h->amsgrad ? vmaxo : 0};                                     \
    const int nt = h->nontemporal && aligned32(outs, 4, lo, (int64_t)sizeof(T));               \
    int64_t i = lo;                                                                            \
    const P##_T B2 = P##_SET1(b2), W2 = P##_SET1(w2);                                          \
    const P##_T COEF = P##_SET1(small ? w1 : w1 - (T)1);                                       \
    const P##_T SS = P##_SET1(ss), BC = P##_SET1(bc), EPS = P##_SET1(eps), WD = P##_SET1(wd);  \
    const P##_T KEEP = P##_SET1(keep), NLRWD = P##_SET1(nlrwd), NEG = P##_SET1((T)-1);         \
    for (; i + P##_W <= hi; i += P##_W) {                                                      \
      P##_T gi = P##_LOAD(g + i);                                                              \
      if (h->maximize) gi = P##_MUL(gi, NEG);                                                  \
      if (h->l2) gi = P##_ADD(gi, P##_MUL(P##_LOAD(p + i), WD));                               \
      const P##_T mi = P##_LOAD(m + i);                                                        \
      const P##_T mn = P##_FMA(COEF, P##_SUB(gi, mi), small ? mi : gi);                        \
      const P##_T vn = P##_ADD(P##_MUL(P##_LOAD(v + i), B2), P##_MUL(P##_MUL(W2, gi), gi));    \
      STORE(P, mo + i, mn, nt);                                                             \
      STORE(P, vo + i, vn, nt);                                                             \
      P##_T den;                                                                               \
      if (h->amsgrad) {                                                                        \
        const P##_T mx = P##_MAX(P##_LOAD(vmax + i), vn);                                      \
        STORE(P, vmaxo + i, mx, nt);                                                        \
        den = P##_ADD(P##_DIV(P##_SQRT(mx), BC), EPS);                                         \
      } else {                                                                                 \
        den = P##_ADD(P##_DIV(P##_SQRT(vn), BC), EPS);                                         \
      }                                                                                        \
      const P##_T step = P##_DIV(P##_MUL(SS, mn), den);                                        \
      P##_T r;                                                                                 \
      if (h->write_params) {                                                                   \
        P##_T pi = P##_LOAD(p + i);                                                            \
        if (h->decoupled) pi = P##_MUL(pi, KEEP);                                              \
        r = P##_SUB(pi, step);                                                                 \
      } else {                                                                                 \
        r = P##_SUB(P##_SET1((T)0), step);                                                     \
        if (h->decoupled) r = P##_ADD(r, P##_MUL(P##_LOAD(p + i), NLRWD));                     \
      }                                                                                        \
      STORE(P, out + i, r, nt);                                                             \
    }                                                                                          \
    for (; i < hi; i++) {                                                                      \
      T gi = g[i];                                                                             \
      if (h->maximize) gi = -gi;                                                               \
      if (h->l2) gi += p[i] * wd;                                                              \
      const T mn = small ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * ((T)1 - w1);           \
      const T vn = v[i] * b2 + w2 * gi * gi;                                                   \
      mo[i] = mn;                                                                              \
      vo[i] = vn;                                                                              \
      T den;                                                                                   \
      if (h->amsgrad) {                                                                        \
        const T mx = vmax[i] > vn ? vmax[i] : vn;                                              \
        vmaxo[i] = mx;                                                                         \
        den = (T)sqrt((double)mx) / bc + eps;                                                  \
      } else {                                                                                 \
        den = (T)sqrt((double)vn) / bc + eps;                                                  \
      }                                                                                        \
      const T step = ss * mn / den;                                                            \
      if (h->write_params) {                                                                   \
        out[i] = (h->decoupled ? p[i] * keep : p[i]) - step;                                   \
      } else {                                                                                 \
        T r = (T)0 - step;                                                                     \
        if (h->decoupled) r += p[i] * nlrwd;                                                   \
        out[i] = r;                                                                            \
      }                                                                                        \
    }                                                                                          \
  }

ADAM_KERNEL(funcopt_adam_f32, float, F)
ADAM_KERNEL(funcopt_adam_f64, double, D)
ENTRY(funcopt_adam_f32, float, 9, 5)
ENTRY(funcopt_adam_f64, double, 9, 5)

/* ---- SGD with momentum ---------------------------------------------------------------------
 * arrays per tensor (5): g, buf, p, out, buf_out. d = g (sign-flipped, plus wd*p for L2);
 * with a momentum buffer: buf' = d on the first step, else buf*momentum + d*(1 - dampening);
 * then d = buf' (or d + buf'*momentum with nesterov). `out` is d * -lr or, with write_params,
 * p + d * -lr. */
#define SGD_KERNEL(NAME, T, P)                                                                 \
  static void NAME##_range(T *const *a, int64_t lo, int64_t hi, const void *args) {            \
    const sgd_args *h = (const sgd_args *)args;                                                \
    const T *g = a[0], *buf = a[1], *p = a[2];                                                 \
    T *out = a[3], *bo = a[4];                                                                 \
    const T nlr = (T)(-h->lr), mom = (T)h->momentum, damp = (T)(1.0 - h->dampening);           \
    const T wd = (T)h->weight_decay;                                                           \
    void *outs[2] = {out, h->has_buf ? bo : 0};                                                \
    const int nt = h->nontemporal && aligned32(outs, 2, lo, (int64_t)sizeof(T));               \
    int64_t i = lo;                                                                            \
    const P##_T NLR = P##_SET1(nlr), MOM = P##_SET1(mom), DAMP = P##_SET1(damp);               \
    const P##_T WD = P##_SET1(wd), NEG = P##_SET1((T)-1);                                      \
    for (; i + P##_W <= hi; i += P##_W) {                                                      \
      P##_T d = P##_LOAD(g + i);                                                               \
      if (h->maximize) d = P##_MUL(d, NEG);                                                    \
      if (h->l2) d = P##_ADD(d, P##_MUL(P##_LOAD(p + i), WD));                                 \
      if (h->has_buf) {                                                                        \
        const P##_T bn =                                                                       \
            h->first ? d : P##_ADD(P##_MUL(P##_LOAD(buf + i), MOM), P##_MUL(d, DAMP));         \
        STORE(P, bo + i, bn, nt);                                                           \
        d = h->nesterov ? P##_ADD(d, P##_MUL(bn, MOM)) : bn;                                   \
      }                                                                                        \
      const P##_T r = P##_MUL(d, NLR);                                                         \
      STORE(P, out + i, h->write_params ? P##_ADD(P##_LOAD(p + i), r) : r, nt);             \
    }                                                                                          \
    for (; i < hi; i++) {                                                                      \
      T d = g[i];                                                                              \
      if (h->maximize) d = -d;                                                                 \
      if (h->l2) d += p[i] * wd;                                                               \
      if (h->has_buf) {                                                                        \
        const T bn = h->first ? d : buf[i] * mom + d * damp;                                   \
        bo[i] = bn;                                                                            \
        d = h->nesterov ? d + bn * mom : bn;                                                   \
      }                                                                                        \
      const T r = d * nlr;                                                                     \
      out[i] = h->write_params ? p[i] + r : r;                                                 \
    }                                                                                          \
  }

SGD_KERNEL(funcopt_sgd_f32, float, F)
SGD_KERNEL(funcopt_sgd_f64, double, D)
ENTRY(funcopt_sgd_f32, float, 5, 3)
ENTRY(funcopt_sgd_f64, double, 5, 3)

/* ---- out = x + y (apply_updates) -----------------------------------------------------------
 * arrays per tensor (3): x, y, out. */
#define ADD_KERNEL(NAME, T, P)                                                                 \
  static void NAME##_range(T *const *a, int64_t lo, int64_t hi, const void *args) {            \
    const int64_t nontemporal = ((const add_args *)args)->nontemporal;                         \
    const T *x = a[0], *y = a[1];                                                              \
    T *out = a[2];                                                                             \
    void *outs[1] = {out};                                                                     \
    const int nt = nontemporal && aligned32(outs, 1, lo, (int64_t)sizeof(T));                  \
    int64_t i = lo;                                                                            \
    for (; i + P##_W <= hi; i += P##_W)                                                        \
      STORE(P, out + i, P##_ADD(P##_LOAD(x + i), P##_LOAD(y + i)), nt);                     \
    for (; i < hi; i++) out[i] = x[i] + y[i];                                                  \
  }

ADD_KERNEL(funcopt_add_f32, float, F)
ADD_KERNEL(funcopt_add_f64, double, D)
ENTRY(funcopt_add_f32, float, 3, 2)
ENTRY(funcopt_add_f64, double, 3, 2)

/* The layout version of the argument structs, checked by funcopt/native.py after loading. */
int funcopt_native_abi(void) { return (int)(sizeof(adam_args) * 100 + sizeof(sgd_args)); }
