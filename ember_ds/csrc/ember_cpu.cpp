// Ember's two per-piece passes on CPU, fused: one pass over G for the statistics, one pass over
// G and W for the update (ember_ds/cpu_fused.py builds this file once per machine and calls it
// through ctypes; ember_ds/factored.py is the reference it must equal).
//
// Plain C ABI, no torch or Python headers: the build is one g++ call of about a second.
// Compile with -ffp-contract=off (no FMA contraction: the update must round exactly as torch's
// separate ops do) and without -ffast-math (no reassociation: the sums' order is the code's).
//
// Determinism: work is cut into row blocks whose number depends on the piece's shape only,
// never on the thread count; each row's sum is accumulated by one thread in a fixed lane order,
// and the per-block column partial sums are added in block order. Results are therefore
// bitwise the same for any number of threads (and any vector width the compiler picks).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

enum Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's rounding.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(__FLT16_MAX__)
#define EMBER_HAVE_F16 1
typedef _Float16 f16_t;
#else
#define EMBER_HAVE_F16 0
typedef uint16_t f16_t;  // never used: the loader sees ember_has_f16() == 0
#endif

// 16-float vectors (GCC/Clang vector extensions: AVX-512, AVX2, SSE or NEON, whichever the
// -march gives; the lane order, hence every sum's order, is the same on all of them).
typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

template <int D> struct Io;
template <> struct Io<F32> {
  typedef float T;
  static inline float ld(const T* p, int64_t j) { return p[j]; }
  static inline void st(T* p, int64_t j, float v) { p[j] = v; }
  static inline v16 ld16(const T* p) { v16 v; std::memcpy(&v, p, 64); return v; }
  static inline void st16(T* p, v16 v) { std::memcpy(p, &v, 64); }
};
template <> struct Io<BF16> {
  typedef uint16_t T;
  static inline float ld(const T* p, int64_t j) { return bf16_to_f32(p[j]); }
  static inline void st(T* p, int64_t j, float v) { p[j] = f32_to_bf16(v); }
  static inline v16 ld16(const T* p) {
    u16x16 h;
    std::memcpy(&h, p, 32);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    v16 v;
    std::memcpy(&v, &u, 64);
    return v;
  }
  static inline void st16(T* p, v16 v) {
    u32x16 u;
    std::memcpy(&u, &v, 64);
    u32x16 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    i32x16 nan = v != v;
    r = nan ? u32x16{} + 0x7FC0u : r;
    u16x16 h = __builtin_convertvector(r, u16x16);
    std::memcpy(p, &h, 32);
  }
};
template <> struct Io<F16> {
  typedef f16_t T;
  static inline float ld(const T* p, int64_t j) { return static_cast<float>(p[j]); }
  static inline void st(T* p, int64_t j, float v) { p[j] = static_cast<T>(v); }
  static inline v16 ld16(const T* p) {
    v16 v;
    for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
    return v;
  }
  static inline void st16(T* p, v16 v) {
    for (int l = 0; l < 16; ++l) p[l] = static_cast<T>(v[l]);
  }
};

constexpr int64_t BLOCK_ELEMS = 1 << 16;  // stats: about this many elements per row block
constexpr int64_t MAX_BLOCKS = 256;    // ... and at most this many blocks (column partials)
constexpr int64_t UPDATE_BLOCK_ELEMS = 1 << 18;  // update: elements per block of rows
constexpr int64_t SERIAL_ELEMS = 1 << 15;  // pieces below this run on the calling thread
// Rows a thread reads at once, from K sub-ranges of its block far apart: K memory streams in
// flight instead of one (measured on a 2-core x86-64 VM: stats 1.3-1.8x, update 1.3x faster).
constexpr int STATS_STREAMS = 8;
constexpr int UPDATE_STREAMS = 4;

inline int threads_for(int64_t n, int nthreads) {
  if (nthreads < 1 || n < SERIAL_ELEMS) return 1;
  return nthreads;
}

inline v16 ldv(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
inline void stv(float* p, v16 v) { std::memcpy(p, &v, 64); }

inline float lane_sum(v16 acc) {  // a fixed tree over the 16 lanes
  float lane[16];
  std::memcpy(lane, &acc, 64);
  for (int s = 8; s >= 1; s >>= 1)
    for (int l = 0; l < s; ++l) lane[l] += lane[l + s];
  return lane[0];
}

// K rows g[0..K-1] of n elements: out[k] = sum_j g_kj^2, summed as 16 lanes (one vector per
// row, j in steps of 16), a fixed tree over the lanes, then the scalar tail in order; and
// cp[j] += q_0j, += q_1j, ... in row order.
template <int DG, int K>
inline void rows_stats(const typename Io<DG>::T* const* g, int64_t n, float* __restrict__ cp,
                       float* out) {
  v16 acc[K];
  for (int k = 0; k < K; ++k) acc[k] = v16{};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16 c = ldv(cp + j);
    for (int k = 0; k < K; ++k) {
      v16 x = Io<DG>::ld16(g[k] + j);
      v16 q = x * x;
      acc[k] += q;
      c += q;
    }
    stv(cp + j, c);
  }
  for (int k = 0; k < K; ++k) {
    float tail = 0.0f;
    for (int64_t t = j; t < n; ++t) {
      float v = Io<DG>::ld(g[k], t);
      float q = v * v;
      tail += q;
      cp[t] += q;
    }
    out[k] = lane_sum(acc[k]) + tail;
  }
}

template <int DG>
inline void count_nonzero(const typename Io<DG>::T* g, int64_t n, float* nz) {
  int64_t count = 0;
  for (int64_t k = 0; k < n; ++k) count += Io<DG>::ld(g, k) != 0.0f;
  *nz += static_cast<float>(count);
}

// Rows [r0, r1) into the column partial cp: STATS_STREAMS sub-ranges of q rows read together,
// then the rows left over one at a time (the grouping depends on the shape only).
template <int DG>
void block_stats(const typename Io<DG>::T* g, int64_t r0, int64_t r1, int64_t cols, int64_t ldg,
                 float* rowsum, float* cp, float* rownz) {
  typedef typename Io<DG>::T T;
  constexpr int K = STATS_STREAMS;
  const int64_t q = (r1 - r0) / K;
  for (int64_t i = 0; i < q; ++i) {
    const T* rows[K];
    float out[K];
    for (int k = 0; k < K; ++k) rows[k] = g + (r0 + k * q + i) * ldg;
    rows_stats<DG, K>(rows, cols, cp, out);
    for (int k = 0; k < K; ++k) rowsum[r0 + k * q + i] += out[k];
  }
  for (int64_t i = r0 + K * q; i < r1; ++i) {
    const T* row = g + i * ldg;
    float out;
    rows_stats<DG, 1>(&row, cols, cp, &out);
    rowsum[i] += out;
  }
  if (rownz)
    for (int64_t i = r0; i < r1; ++i) count_nonzero<DG>(g + i * ldg, cols, rownz + i);
}

template <int DG>
void stats(const void* gp, int64_t rows, int64_t cols, int64_t ldg, float* rowsum,
           float* colsum, float* rownz, int nthreads) {
  typedef typename Io<DG>::T T;
  const T* g = static_cast<const T*>(gp);
  const int64_t n = rows * cols;
  int64_t nblk = n / BLOCK_ELEMS;
  if (nblk > MAX_BLOCKS) nblk = MAX_BLOCKS;
  if (nblk > rows) nblk = rows;
  if (nblk < 1) nblk = 1;
  const int64_t per = (rows + nblk - 1) / nblk;
  nblk = (rows + per - 1) / per;
  std::unique_ptr<float[]> part(new float[nblk * cols]);
  const int nt = threads_for(n, nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < nblk; ++b) {
    float* cp = part.get() + b * cols;
    std::memset(cp, 0, sizeof(float) * cols);
    const int64_t r1 = (b + 1) * per < rows ? (b + 1) * per : rows;
    block_stats<DG>(g, b * per, r1, cols, ldg, rowsum, cp, rownz);
  }
  // column sums: the block partials in block order, then added to colsum (as colsum += q.sum(0));
  // on the calling thread (at most 256 x cols adds: one parallel region fewer to join)
  float* acc = part.get();
  for (int64_t b = 1; b < nblk; ++b) {
    const float* cp = part.get() + b * cols;
    for (int64_t j = 0; j < cols; ++j) acc[j] += cp[j];
  }
  for (int64_t j = 0; j < cols; ++j) colsum[j] += acc[j];
}

// w <- w*decay - lr*g/(a_i*b_j + eps), in fp32, rounded once to w's dtype; the fp32 operations
// in the order of the torch path: (w*decay) + ((-lr)*g) / ((a_i*b_j) + eps). K rows at once.
template <int DW, int DG, bool DECAY, int K>
inline void rows_update(typename Io<DW>::T* const* w, const typename Io<DG>::T* const* g,
                        int64_t n, const float* ai, const float* __restrict__ b, float nlr,
                        float eps, float decay) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 bj = ldv(b + j);
    for (int k = 0; k < K; ++k) {
      v16 d = ai[k] * bj;
      d = d + eps;
      v16 wv = Io<DW>::ld16(w[k] + j);
      if (DECAY) wv = wv * decay;
      v16 u = nlr * Io<DG>::ld16(g[k] + j);
      Io<DW>::st16(w[k] + j, wv + u / d);
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int64_t t = j; t < n; ++t) {
      float d = ai[k] * b[t];
      d = d + eps;
      float wv = Io<DW>::ld(w[k], t);
      if (DECAY) wv = wv * decay;
      float u = nlr * Io<DG>::ld(g[k], t);
      Io<DW>::st(w[k], t, wv + u / d);
    }
  }
}

template <int DW, int DG, bool DECAY>
void update(void* wp, const void* gp, int64_t rows, int64_t cols, int64_t ldw, int64_t ldg,
            const float* a, const float* b, float nlr, float eps, float decay, int nthreads) {
  typedef typename Io<DW>::T TW;
  typedef typename Io<DG>::T TG;
  constexpr int K = UPDATE_STREAMS;
  TW* w = static_cast<TW*>(wp);
  const TG* g = static_cast<const TG*>(gp);
  const int64_t per = UPDATE_BLOCK_ELEMS / cols > 1 ? UPDATE_BLOCK_ELEMS / cols : 1;
  const int64_t nblk = (rows + per - 1) / per;
  const int nt = threads_for(rows * cols, nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && nblk > 1)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t r0 = blk * per, r1 = r0 + per < rows ? r0 + per : rows;
    const int64_t q = (r1 - r0) / K;
    for (int64_t i = 0; i < q; ++i) {
      TW* wr[K];
      const TG* gr[K];
      float ai[K];
      for (int k = 0; k < K; ++k) {
        const int64_t r = r0 + k * q + i;
        wr[k] = w + r * ldw;
        gr[k] = g + r * ldg;
        ai[k] = a[r];
      }
      rows_update<DW, DG, DECAY, K>(wr, gr, cols, ai, b, nlr, eps, decay);
    }
    for (int64_t r = r0 + K * q; r < r1; ++r) {
      TW* wr = w + r * ldw;
      const TG* gr = g + r * ldg;
      rows_update<DW, DG, DECAY, 1>(&wr, &gr, cols, a + r, b, nlr, eps, decay);
    }
  }
}

template <int DW, int DG>
void update_d(void* w, const void* g, int64_t rows, int64_t cols, int64_t ldw, int64_t ldg,
              const float* a, const float* b, float nlr, float eps, float decay, int nt) {
  if (decay != 1.0f)
    update<DW, DG, true>(w, g, rows, cols, ldw, ldg, a, b, nlr, eps, decay, nt);
  else
    update<DW, DG, false>(w, g, rows, cols, ldw, ldg, a, b, nlr, eps, decay, nt);
}

}  // namespace

extern "C" {

int ember_abi_version() { return 2; }

int ember_has_f16() { return EMBER_HAVE_F16; }

// rowsum[rows] += sum_j g_ij^2; colsum[cols] += sum_i g_ij^2; rownz (may be null) += count of
// g_ij != 0 per row. g: [rows, cols] with row stride ldg elements. Returns 0, or -1 for an
// unsupported dtype.
int ember_stats(const void* g, int dg, int64_t rows, int64_t cols, int64_t ldg, float* rowsum,
                float* colsum, float* rownz, int nthreads) {
  if (rows <= 0 || cols <= 0) return 0;
  switch (dg) {
    case F32: stats<F32>(g, rows, cols, ldg, rowsum, colsum, rownz, nthreads); return 0;
    case BF16: stats<BF16>(g, rows, cols, ldg, rowsum, colsum, rownz, nthreads); return 0;
#if EMBER_HAVE_F16
    case F16: stats<F16>(g, rows, cols, ldg, rowsum, colsum, rownz, nthreads); return 0;
#endif
    default: return -1;
  }
}

int ember_update(void* w, int dw, const void* g, int dg, int64_t rows, int64_t cols, int64_t ldw,
                 int64_t ldg, const float* a, const float* b, double lr, double eps,
                 double decay, int nthreads) {
  if (rows <= 0 || cols <= 0) return 0;
  const float nlr = static_cast<float>(-lr), e = static_cast<float>(eps),
              dc = static_cast<float>(decay);
#define EMBER_UPD(W, G) update_d<W, G>(w, g, rows, cols, ldw, ldg, a, b, nlr, e, dc, nthreads)
  const int key = dw * 3 + dg;
  switch (key) {
    case F32 * 3 + F32: EMBER_UPD(F32, F32); return 0;
    case F32 * 3 + BF16: EMBER_UPD(F32, BF16); return 0;
    case BF16 * 3 + F32: EMBER_UPD(BF16, F32); return 0;
    case BF16 * 3 + BF16: EMBER_UPD(BF16, BF16); return 0;
#if EMBER_HAVE_F16
    case F32 * 3 + F16: EMBER_UPD(F32, F16); return 0;
    case F16 * 3 + F32: EMBER_UPD(F16, F32); return 0;
    case F16 * 3 + F16: EMBER_UPD(F16, F16); return 0;
#endif
    default: return -1;
  }
#undef EMBER_UPD
}

// One table's state step, after the statistics are reduced: the torch path's ops in ember_ds/
// optimizer.py in their order and fp32 rounding (torch's add_(x, alpha=a) is one fused
// multiply-add, x*a + y, rounded once), in one call instead of a dozen small torch ops:
//   total = sum_j colsum_j;  if total is not finite: return 1, nothing written
//   r <- r*b2 + rowsum*ar;  c <- c*b2 + (colsum/denom_c)*(1-b2);  s <- s*b2 + (total/vd)*(1-b2)
//   row_f = sqrt(r / (max(s, 1e-30)*bc));  col_f = sqrt(c)
// (ar = (1-b2)/cols, vd = V*cols, bc = 1 - b2^step, rounded to fp32 as torch rounds scalars.)
// total is summed in column order (torch sums in its own order: s may differ in the last bit).
int ember_state(float* r, float* c, float* s, const float* rowsum, const float* colsum,
                int64_t rows, int64_t cols, double denom_c, double b2, double ar, double one_m_b2,
                double vd, double bc, float* row_f, float* col_f) {
  float total = 0.0f;
  for (int64_t j = 0; j < cols; ++j) total += colsum[j];
  if (!std::isfinite(total)) return 1;
  const float fb2 = static_cast<float>(b2), far = static_cast<float>(ar),
              f1 = static_cast<float>(one_m_b2), fdc = static_cast<float>(denom_c);
  for (int64_t j = 0; j < cols; ++j) {
    c[j] = std::fma(colsum[j] / fdc, f1, c[j] * fb2);
    col_f[j] = std::sqrt(c[j]);
  }
  s[0] = std::fma(total / static_cast<float>(vd), f1, s[0] * fb2);  // s needs only the total,
  const float den = (s[0] < 1e-30f ? 1e-30f : s[0]) * static_cast<float>(bc);  // clamp_min
  for (int64_t i = 0; i < rows; ++i) {  // so r and its factors take one pass over the rows
    r[i] = std::fma(rowsum[i], far, r[i] * fb2);
    row_f[i] = std::sqrt(r[i] / den);
  }
  return 0;
}

}  // extern "C"
