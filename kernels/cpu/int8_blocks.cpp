// Int8 inference on CPUs with AVX512-VNNI (fp32 activations in and out):
//
//   int8_linear          per-token GEMMs  out[t] = rescale(q(x[t]) . W_t), optionally ReLU'd
//   int8_grouped_linear  grouped GEMMs (MoE experts): the rows of group g times W_g
//   int8_rankmixer_block a whole RankMixer block (mixing, Norm1, GEMM, GELU, GEMM, residual,
//                        Norm2) in one pass per (token, row block)
//   int8_swiglu_stage    one TokenMixer-Large pSwiGLU stage (RMSNorm, gate/up GEMM,
//                        Swish * up, down GEMM, residual) in one pass per (head, row block)
//   int8_unimixer_ffn    UniMixer's FFN sub-layer on its two SiameseNorm streams (RMSNorm,
//                        gate/up GEMM, Swish * up, down GEMM, both streams' updates)
//
// The arithmetic is kernels/cpu/int8.py's: weights int8 per output channel (w_q, s_w), each
// activation row quantized at run time to q = round(x / s_x), s_x = max |x| / 127, stored as
// u8 = q + 128 (VPDPBUSD multiplies u8 by s8); the zero point comes back out through the
// accumulators' starting value -128 * sum_k w_q[k, n]. The int32 sums are exact and are
// rescaled as the Python routes do: y = float(acc) * s_w[n], then y * s_x (+ bias by one FMA,
// as torch.addcmul): int8_linear gives the same bytes as Int8PerToken's routes
// (tests/test_int8_vnni.py).
//
// The micro-kernel holds a 6-row x 64-column block of int32 accumulators in 24 zmm registers and
// steps K by 4 (one VPDPBUSD per 16 columns and row); weights are packed once per GEMM as
// [N/16][K/4][16 columns][4 k] so that each step loads one 64-byte vector per 16 columns.
// On CPUs with AMX-INT8 (gemm_backend(1), chosen by kernels/cpu/vnni.py where the CPU and the
// kernel allow it) a GEMM whose padded K is a multiple of 64 and N of 32 runs on AMX tiles
// instead: 32 x 32 int32 accumulator blocks (2 x 2 tiles) starting from the same correction,
// K in steps of 64, the same weight packing (a B tile is 16 consecutive 64-byte K quads of one
// 16-column group), the same rescale: the same bytes. gemm_backend(2) runs that path on
// emulated tiles (amx.h), which is how it is tested on CPUs without AMX.
// The fused blocks keep every intermediate of a row block (the normed rows, their u8 copy, the
// hidden rows, their u8 copy) in thread-local buffers that stay in the core's L2; the unfused
// path writes and re-reads each through memory as fp32 tensors.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cpuid.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "amx.h"
#include "simd.h"

namespace {

using mixrank_simd::gelu;
using mixrank_simd::swiglu;

constexpr int64_t MT = 6;      // rows per micro-tile
constexpr int64_t GT = 4;      // 16-column groups per micro-tile
constexpr int32_t ZP = 128;    // the activations' zero point
constexpr float QMAX = 127.f;  // activations: symmetric 8-bit

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// One row of K fp32 values to Kp u8 (q + 128; the padding is the zero point) and its scale,
// as kernels.cpu.int8.quantize_rows: s = max |x| / 127 (1 for a row of zeros), q = x / s rounded
// half to even.
inline float quantize_row(const float* x, int64_t K, uint8_t* q, int64_t Kp) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(K - k), x + k);
    m = _mm512_max_ps(m, _mm512_andnot_ps(sign, v));
  }
  float s = _mm512_reduce_max_ps(m) / QMAX;
  if (!(s > 0.f)) s = 1.f;
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i zp = _mm512_set1_epi32(ZP);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = tail_mask(K - k);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + k), vs);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(v), zp);
    _mm_mask_storeu_epi8(q + k, mk, _mm512_cvtepi32_epi8(u));
  }
  if (Kp > K) std::memset(q + K, ZP, Kp - K);
  return s;
}

// One 16-column vector of int32 sums into fp32, as the Python routes rescale: float(acc) * s_w,
// then * s_x (+ bias by one FMA, as torch.addcmul), ReLU'd where asked; `mk` masks the columns.
inline void rescale_store(float* o, __m512i acc, __m512 w, __m512 s, const float* bias, __m512 bb,
                          bool relu, __mmask16 mk) {
  const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), w);
  __m512 v = bias ? _mm512_fmadd_ps(y, s, bb) : _mm512_mul_ps(y, s);
  if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);  // NaN stays NaN, as torch.relu
  _mm512_mask_storeu_ps(o, mk, v);
}

// rows x Kp u8 (leading dimension Kp) times one 6 x 64 block of packed weights, rescaled into
// fp32 out (leading dimension ldo): out = float(acc) * s_w * s_x (+ bias, one FMA). b points
// at the first of G 16-column groups (gstride bytes apart), corr at -128 * colsum of the same
// columns, ncols is how many of the 16 G columns are real (the last group may be partial).
// The 24 accumulators are named variables, not an array: GCC kept an array of them in memory
// and copied each through the stack on every step (a third of the speed).
// Four bytes as one int32 (memcpy: no aliasing of the u8 buffer; compiles to the broadcast's load).
inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc += the u8 x s8 products of a and b, four per int32 lane, in place: GCC 12's intrinsic
// copied each accumulator to another register and back around every step.
inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

#define MIXRANK_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MIXRANK_DECL(i) __m512i c##i##0, c##i##1, c##i##2, c##i##3;
#define MIXRANK_INIT(i)                       \
  if constexpr (M > i) {                      \
    c##i##0 = k0;                             \
    if constexpr (G > 1) c##i##1 = k1;        \
    if constexpr (G > 2) c##i##2 = k2;        \
    if constexpr (G > 3) c##i##3 = k3;        \
  }
#define MIXRANK_STEP(i)                                                              \
  if constexpr (M > i) {                                                             \
    const __m512i av = _mm512_set1_epi32(load4(a + i * lda + kk * 4));             \
    dpbusd(c##i##0, av, b0);                                  \
    if constexpr (G > 1) dpbusd(c##i##1, av, b1);             \
    if constexpr (G > 2) dpbusd(c##i##2, av, b2);             \
    if constexpr (G > 3) dpbusd(c##i##3, av, b3);             \
  }
#define MIXRANK_OUT(i)                                                               \
  if constexpr (M > i) {                                                             \
    const __m512 s = _mm512_set1_ps(sx[i]);                                          \
    store(out + i * ldo, c##i##0, 0, s);                                             \
    if constexpr (G > 1) store(out + i * ldo, c##i##1, 1, s);                        \
    if constexpr (G > 2) store(out + i * ldo, c##i##2, 2, s);                        \
    if constexpr (G > 3) store(out + i * ldo, c##i##3, 3, s);                        \
  }

template <int M, int G>
void tile(const uint8_t* a, int64_t lda, const int8_t* b, int64_t gstride, int64_t kq,
          const int32_t* corr, const float* sw, const float* sx, const float* bias, float* out,
          int64_t ldo, int64_t ncols, bool relu) {
  MIXRANK_ROWS(MIXRANK_DECL)
  const __m512i k0 = _mm512_loadu_si512(corr);
  const __m512i k1 = G > 1 ? _mm512_loadu_si512(corr + 16) : k0;
  const __m512i k2 = G > 2 ? _mm512_loadu_si512(corr + 32) : k0;
  const __m512i k3 = G > 3 ? _mm512_loadu_si512(corr + 48) : k0;
  MIXRANK_ROWS(MIXRANK_INIT)
  for (int64_t kk = 0; kk < kq; ++kk) {
    const int8_t* bk = b + kk * 64;
    const __m512i b0 = _mm512_loadu_si512(bk);
    const __m512i b1 = G > 1 ? _mm512_loadu_si512(bk + gstride) : b0;
    const __m512i b2 = G > 2 ? _mm512_loadu_si512(bk + 2 * gstride) : b0;
    const __m512i b3 = G > 3 ? _mm512_loadu_si512(bk + 3 * gstride) : b0;
    MIXRANK_ROWS(MIXRANK_STEP)
  }
  __m512 w[G], bb[G];
  __mmask16 mk[G];
  for (int j = 0; j < G; ++j) {
    mk[j] = tail_mask(ncols - 16 * j);
    w[j] = _mm512_maskz_loadu_ps(mk[j], sw + 16 * j);
    bb[j] = bias ? _mm512_maskz_loadu_ps(mk[j], bias + 16 * j) : _mm512_setzero_ps();
  }
  auto store = [&](float* o, __m512i acc, int j, __m512 s) {
    rescale_store(o + 16 * j, acc, w[j], s, bias, bb[j], relu, mk[j]);
  };
  MIXRANK_ROWS(MIXRANK_OUT)
}

#undef MIXRANK_ROWS
#undef MIXRANK_DECL
#undef MIXRANK_INIT
#undef MIXRANK_STEP
#undef MIXRANK_OUT

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const int32_t*,
                        const float*, const float*, const float*, float*, int64_t, int64_t, bool);

template <int M>
constexpr TileFn row_of_tiles(int g) {
  return g == 1 ? tile<M, 1> : g == 2 ? tile<M, 2> : g == 3 ? tile<M, 3> : tile<M, 4>;
}

TileFn pick(int64_t m, int64_t g) {
  static const TileFn table[MT][GT] = {
      {row_of_tiles<1>(1), row_of_tiles<1>(2), row_of_tiles<1>(3), row_of_tiles<1>(4)},
      {row_of_tiles<2>(1), row_of_tiles<2>(2), row_of_tiles<2>(3), row_of_tiles<2>(4)},
      {row_of_tiles<3>(1), row_of_tiles<3>(2), row_of_tiles<3>(3), row_of_tiles<3>(4)},
      {row_of_tiles<4>(1), row_of_tiles<4>(2), row_of_tiles<4>(3), row_of_tiles<4>(4)},
      {row_of_tiles<5>(1), row_of_tiles<5>(2), row_of_tiles<5>(3), row_of_tiles<5>(4)},
      {row_of_tiles<6>(1), row_of_tiles<6>(2), row_of_tiles<6>(3), row_of_tiles<6>(4)},
  };
  return table[m - 1][g - 1];
}

// One GEMM of a row block: M rows of u8 activations aq [M, Kp] (scales sx) times one token's
// packed weights w [Np/16][Kp/4][64], rescaled into out [M, N] (leading dimension ldo).
// Column panels of 64 outside, 6-row tiles inside: a panel's weights stay in L1 across tiles.
void gemm(const uint8_t* aq, const float* sx, int64_t M, int64_t Kp, const int8_t* w,
          const int32_t* corr, const float* sw, const float* bias, int64_t N, float* out,
          int64_t ldo, bool relu) {
  const int64_t kq = Kp / 4, gstride = kq * 64, groups = round_up(N, 16) / 16;
  for (int64_t g0 = 0; g0 < groups; g0 += GT) {
    const int64_t g = std::min(GT, groups - g0), n0 = g0 * 16;
    const int64_t ncols = std::min(N - n0, g * 16);
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int64_t m = std::min(MT, M - m0);
      pick(m, g)(aq + m0 * Kp, Kp, w + g0 * gstride, gstride, kq, corr + n0, sw + n0, sx + m0,
                 bias ? bias + n0 : nullptr, out + m0 * ldo + n0, ldo, ncols, relu);
    }
  }
}

// The same GEMM on AMX tiles (Tiles: mixrank_amx::AmxTiles or EmulatedTiles), for Kp % 64 == 0
// and N padded to 32 (the packed weights hold round_up(N, 16) columns: N % 32 in 17..31 or 0).
// aq must hold round_up(M, 16) rows (a tile reads 16). Per 32-column panel and 32-row block:
// tiles 0-3 start from the zero-point correction (a row stride of 0 repeats it), K in steps of
// 64 (two A tiles of 16 rows, two B tiles of 16 K quads), stored to a 32 x 32 int32 block and
// rescaled as the VNNI tiles rescale.
template <class Tiles>
void gemm_amx(const uint8_t* aq, const float* sx, int64_t M, int64_t Kp, const int8_t* w,
              const int32_t* corr, const float* sw, const float* bias, int64_t N, float* out,
              int64_t ldo, bool relu) {
  static const mixrank_amx::TileConfig cfg;
  Tiles::config(cfg);
  const int64_t gstride = (Kp / 4) * 64, ksteps = Kp / 64;
  alignas(64) int32_t c[32][32];
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const int8_t *b0 = w + (n0 / 16) * gstride, *b1 = b0 + gstride;
    const int64_t ncols = std::min<int64_t>(32, N - n0);
    __m512 wv[2], bb[2];
    __mmask16 mk[2];
    for (int j = 0; j < 2; ++j) {
      mk[j] = ncols > 16 * j ? tail_mask(ncols - 16 * j) : 0;
      wv[j] = _mm512_maskz_loadu_ps(mk[j], sw + n0 + 16 * j);
      bb[j] = bias ? _mm512_maskz_loadu_ps(mk[j], bias + n0 + 16 * j) : _mm512_setzero_ps();
    }
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const int64_t rows = std::min<int64_t>(32, M - m0);
      const bool two = rows > 16;  // a second 16-row A tile
      Tiles::template load<0>(corr + n0, 0);
      Tiles::template load<1>(corr + n0 + 16, 0);
      if (two) {
        Tiles::template load<2>(corr + n0, 0);
        Tiles::template load<3>(corr + n0 + 16, 0);
      }
      const uint8_t* a = aq + m0 * Kp;
      for (int64_t kk = 0; kk < ksteps; ++kk) {
        Tiles::template load<4>(a + kk * 64, Kp);
        Tiles::template load<6>(b0 + kk * 1024, 64);
        Tiles::template load<7>(b1 + kk * 1024, 64);
        Tiles::template dpbusd<0, 4, 6>();
        Tiles::template dpbusd<1, 4, 7>();
        if (two) {
          Tiles::template load<5>(a + 16 * Kp + kk * 64, Kp);
          Tiles::template dpbusd<2, 5, 6>();
          Tiles::template dpbusd<3, 5, 7>();
        }
      }
      Tiles::template store<0>(&c[0][0], 128);
      Tiles::template store<1>(&c[0][16], 128);
      if (two) {
        Tiles::template store<2>(&c[16][0], 128);
        Tiles::template store<3>(&c[16][16], 128);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 s = _mm512_set1_ps(sx[m0 + r]);
        float* o = out + (m0 + r) * ldo + n0;
        for (int j = 0; j < 2; ++j)
          if (mk[j]) rescale_store(o + 16 * j, _mm512_load_si512(&c[r][16 * j]), wv[j], s, bias,
                                   bb[j], relu, mk[j]);
      }
    }
  }
  Tiles::release();
}

// Which GEMM the ops run (gemm_backend): 0 the AVX512-VNNI tiles; 1 AMX-INT8; 2 AMX emulated.
std::atomic<int> g_backend{0};

bool cpu_has_amx_int8() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 24 & 1) && (d >> 25 & 1);  // AMX-TILE, AMX-INT8
}

int64_t gemm_backend(int64_t kind) {
  TORCH_CHECK(kind >= -1 && kind <= 2, "gemm_backend: kind must be 0 (vnni), 1 (amx) or 2 "
              "(amx emulated), or -1 to read it; got ", kind);
  if (kind == 1) {
#ifdef __AMX_INT8__
    TORCH_CHECK(cpu_has_amx_int8(), "gemm_backend: this CPU lacks AMX-INT8");
    TORCH_CHECK(mixrank_amx::amx_permitted(), "gemm_backend: the kernel refused AMX tile state");
#else
    TORCH_CHECK(false, "gemm_backend: this build has no AMX-INT8 (compiled without -mamx-int8)");
#endif
  }
  return kind < 0 ? g_backend.load() : g_backend.exchange(static_cast<int>(kind));
}

int64_t emulated_tdpbusd() { return mixrank_amx::EmulatedTiles::count().load(); }

// LayerNorm (gamma, beta) or RMSNorm (gamma) of one fp32 row of D, D % 16 == 0, into out
// (which may be the row itself); the same formulas as the eager norms, summed in fp32.
inline void norm_row(const float* x, int64_t D, const float* g, const float* b, float eps,
                     bool rms, float* out) {
  __m512 acc = _mm512_setzero_ps();
  float mean = 0.f;
  if (!rms) {
    for (int64_t k = 0; k < D; k += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + k));
    mean = _mm512_reduce_add_ps(acc) / D;
    acc = _mm512_setzero_ps();
  }
  const __m512 vmean = _mm512_set1_ps(mean);
  for (int64_t k = 0; k < D; k += 16) {
    const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(x + k), vmean);
    acc = _mm512_fmadd_ps(c, c, acc);
  }
  const __m512 vr = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / D + eps));
  for (int64_t k = 0; k < D; k += 16) {
    const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + k), vmean), vr);
    _mm512_storeu_ps(out + k, b ? _mm512_fmadd_ps(c, _mm512_loadu_ps(g + k), _mm512_loadu_ps(b + k))
                                : _mm512_mul_ps(c, _mm512_loadu_ps(g + k)));
  }
}

void check_f32(const at::Tensor& t, const char* op, const std::string& name, int64_t numel) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": ", name,
              " must be a contiguous fp32 tensor");
  TORCH_CHECK(numel < 0 || t.numel() == numel, op, ": ", name, " has ", t.numel(),
              " elements, expected ", numel);
}

// A prepared GEMM: packed int8 weights [T, Np/16, Kp/4, 64], corr int32 [T, Np], scales fp32
// [T, N], bias fp32 [T, N] or empty. Checked against the token count and the GEMM's K and N.
struct Gemm {
  const int8_t* w;
  const int32_t* corr;
  const float* sw;
  const float* bias;
  int64_t k, n, kp, np;

  Gemm(const char* op, const char* name, const at::Tensor& packed, const at::Tensor& corr_,
       const at::Tensor& sw_, const at::Tensor& bias_, int64_t k_, int64_t T) : k(k_) {
    TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(0) == T &&
                    packed.size(3) == 64 && packed.is_contiguous(),
                op, ": ", name, " must be packed by kernels.cpu.vnni.prepare for ", T, " tokens");
    np = packed.size(1) * 16;
    kp = packed.size(2) * 4;
    TORCH_CHECK(k > 0 && round_up(k, 4) == kp, op, ": ", name, " has K = ", k, ", packed as ", kp);
    TORCH_CHECK(sw_.dim() == 2 && sw_.size(0) == T, op, ": ", name, " scales must be [T, N]");
    n = sw_.size(1);
    check_f32(sw_, op, std::string(name) + " scales", T * n);
    TORCH_CHECK(round_up(n, 16) == np, op, ": ", name, " scales have N = ", n,
                ", the packed weights ", np, " columns");
    TORCH_CHECK(corr_.scalar_type() == at::kInt && corr_.is_contiguous() && corr_.numel() == T * np,
                op, ": ", name, " zero-point correction must be int32 [T, ", np, "]");
    if (bias_.numel()) check_f32(bias_, op, std::string(name) + " bias", T * n);
    w = packed.data_ptr<int8_t>();
    corr = corr_.data_ptr<int32_t>();
    sw = sw_.data_ptr<float>();
    bias = bias_.numel() ? bias_.data_ptr<float>() : nullptr;
  }

  // aq holds round_up(M, 16) rows (AMX tiles read 16 at a time)
  void run(int64_t t, const uint8_t* aq, const float* sx, int64_t M, float* out, int64_t ldo,
           bool relu = false) const {
    const int backend = (kp % 64 == 0 && np % 32 == 0) ? g_backend.load() : 0;
    auto f = gemm;
#ifdef __AMX_INT8__
    if (backend == 1) f = gemm_amx<mixrank_amx::AmxTiles>;
#endif
    if (backend == 2) f = gemm_amx<mixrank_amx::EmulatedTiles>;
    f(aq, sx, M, kp, w + t * (np / 16) * kp * 16, corr + t * np, sw + t * n,
      bias ? bias + t * n : nullptr, n, out, ldo, relu);
  }
};

bool available() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& corr,
                       const at::Tensor& sw, const at::Tensor& bias, int64_t k,
                       int64_t row_block, bool relu) {
  const char* op = "int8_linear";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3, op, ": x must be fp32 [T, B, K]");
  TORCH_CHECK(row_block > 0, op, ": row_block must be positive");
  const auto xc = x.contiguous();
  const int64_t T = xc.size(0), B = xc.size(1), K = xc.size(2);
  const Gemm g(op, "weight", packed, corr, sw, bias, k, T);
  TORCH_CHECK(K == g.k, op, ": x has K = ", K, ", the weights ", g.k, " rows");
  auto out = at::empty({T, B, g.n}, xc.options());
  if (B == 0 || T == 0) return out;
  const int64_t nrb = (B + row_block - 1) / row_block;
  const float* X = xc.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T * nrb, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> aq(round_up(row_block, 16) * g.kp);
    std::vector<float> sx(row_block);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nrb, r0 = (i % nrb) * row_block, M = std::min(row_block, B - r0);
      for (int64_t r = 0; r < M; ++r)
        sx[r] = quantize_row(X + (t * B + r0 + r) * K, K, aq.data() + r * g.kp, g.kp);
      g.run(t, aq.data(), sx.data(), M, O + (t * B + r0) * g.n, g.n, relu);
    }
  });
  return out;
}

// Grouped GEMMs (MoE experts): rows offsets[g] .. offsets[g + 1] of x [M, K] times group g's
// weights, each row quantized as int8_linear quantizes; rows outside every group are 0.
at::Tensor int8_grouped_linear(const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& corr, const at::Tensor& sw,
                               const at::Tensor& bias, int64_t k, const at::Tensor& offsets,
                               int64_t row_block, bool relu) {
  const char* op = "int8_grouped_linear";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op, ": x must be fp32 [M, K]");
  TORCH_CHECK(row_block > 0, op, ": row_block must be positive");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), G = packed.dim() == 4 ? packed.size(0) : -1;
  const Gemm g(op, "weight", packed, corr, sw, bias, k, G);
  TORCH_CHECK(K == g.k, op, ": x has K = ", K, ", the weights ", g.k, " rows");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() == G + 1,
              op, ": offsets must be int64 [", G + 1, "] (one more than the groups)");
  const auto oc = offsets.contiguous();
  const int64_t* off = oc.data_ptr<int64_t>();
  TORCH_CHECK(off[0] >= 0 && off[G] <= M, op, ": offsets span rows ", off[0], " .. ", off[G],
              " of x's ", M);
  std::vector<std::array<int64_t, 3>> items;  // (group, first row, rows)
  for (int64_t e = 0; e < G; ++e) {
    TORCH_CHECK(off[e + 1] >= off[e], op, ": offsets must not decrease (group ", e, ": ", off[e],
                " -> ", off[e + 1], ")");
    for (int64_t r0 = off[e]; r0 < off[e + 1]; r0 += row_block)
      items.push_back({e, r0, std::min(row_block, off[e + 1] - r0)});
  }
  auto out = at::empty({M, g.n}, xc.options());
  float* O = out.data_ptr<float>();
  if (off[0] > 0) std::memset(O, 0, off[0] * g.n * sizeof(float));
  if (off[G] < M) std::memset(O + off[G] * g.n, 0, (M - off[G]) * g.n * sizeof(float));
  const float* X = xc.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> aq(round_up(row_block, 16) * g.kp);
    std::vector<float> sx(row_block);
    for (int64_t i = begin; i < end; ++i) {
      const auto [e, r0, rows] = items[i];
      for (int64_t r = 0; r < rows; ++r)
        sx[r] = quantize_row(X + (r0 + r) * K, K, aq.data() + r * g.kp, g.kp);
      g.run(e, aq.data(), sx.data(), rows, O + r0 * g.n, g.n, relu);
    }
  });
  return out;
}

at::Tensor int8_rankmixer_block(const at::Tensor& x, const at::Tensor& g1, const at::Tensor& be1,
                                double eps1, const at::Tensor& w1, const at::Tensor& c1,
                                const at::Tensor& s1, const at::Tensor& b1, int64_t k1,
                                const at::Tensor& w2, const at::Tensor& c2, const at::Tensor& s2,
                                const at::Tensor& b2, int64_t k2,
                                const at::Tensor& g2, const at::Tensor& be2, double eps2,
                                bool rms, int64_t row_block) {
  const char* op = "int8_rankmixer_block";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3, op, ": x must be fp32 [T, B, D]");
  const auto xc = x.contiguous();
  const int64_t T = xc.size(0), B = xc.size(1), D = xc.size(2);
  TORCH_CHECK(D % T == 0 && D % 16 == 0, op, ": D = ", D, " must be a multiple of T and of 16");
  TORCH_CHECK(row_block > 0, op, ": row_block must be positive");
  const Gemm G1(op, "w1", w1, c1, s1, b1, k1, T), G2(op, "w2", w2, c2, s2, b2, k2, T);
  const int64_t Hd = G1.n, Dp = G1.kp, Hp = G2.kp;
  TORCH_CHECK(G1.k == D && G2.n == D && G2.k == Hd, op, ": the weights' shapes (", G1.k, " x ",
              G1.n, ", ", G2.k, " x ", G2.n, ") do not chain D = ", D, " -> Hd -> D");
  check_f32(g1, op, "norm1 weight", D);
  check_f32(g2, op, "norm2 weight", D);
  if (!rms) {
    check_f32(be1, op, "norm1 bias", D);
    check_f32(be2, op, "norm2 bias", D);
  }
  auto out = at::empty_like(xc);
  if (B == 0) return out;
  const int64_t d = D / T, nrb = (B + row_block - 1) / row_block;
  const float *X = xc.data_ptr<float>(), *G1w = g1.data_ptr<float>(), *G2w = g2.data_ptr<float>();
  const float* B1n = rms ? nullptr : be1.data_ptr<float>();
  const float* B2n = rms ? nullptr : be2.data_ptr<float>();
  const float e1 = static_cast<float>(eps1), e2 = static_cast<float>(eps2);
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T * nrb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(row_block * D), h(row_block * Hd), y(row_block * D), sx(row_block),
        sh(row_block);
    std::vector<uint8_t> aq(round_up(row_block, 16) * Dp), hq(round_up(row_block, 16) * Hp);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nrb, r0 = (i % nrb) * row_block, M = std::min(row_block, B - r0);
      for (int64_t r = 0; r < M; ++r) {  // S = Norm1(TokenMixing(X) + X), then its u8 copy
        float* sr = s.data() + r * D;
        const float* xt = X + (t * B + r0 + r) * D;
        for (int64_t u = 0; u < T; ++u) {
          const float* src = X + (u * B + r0 + r) * D + t * d;
          for (int64_t k = 0; k < d; ++k) sr[u * d + k] = src[k] + xt[u * d + k];
        }
        norm_row(sr, D, G1w, B1n, e1, rms, sr);
        sx[r] = quantize_row(sr, D, aq.data() + r * Dp, Dp);
      }
      G1.run(t, aq.data(), sx.data(), M, h.data(), Hd);
      for (int64_t r = 0; r < M; ++r) {  // GELU, then the hidden rows' u8 copy
        float* hr = h.data() + r * Hd;
        int64_t k = 0;
        for (; k + 16 <= Hd; k += 16) _mm512_storeu_ps(hr + k, gelu(_mm512_loadu_ps(hr + k)));
        if (k < Hd) {
          const __mmask16 mk = tail_mask(Hd - k);
          _mm512_mask_storeu_ps(hr + k, mk, gelu(_mm512_maskz_loadu_ps(mk, hr + k)));
        }
        sh[r] = quantize_row(hr, Hd, hq.data() + r * Hp, Hp);
      }
      G2.run(t, hq.data(), sh.data(), M, y.data(), D);
      for (int64_t r = 0; r < M; ++r) {  // Norm2(Y + S)
        float* yr = y.data() + r * D;
        const float* sr = s.data() + r * D;
        for (int64_t k = 0; k < D; k += 16)
          _mm512_storeu_ps(yr + k, _mm512_add_ps(_mm512_loadu_ps(yr + k), _mm512_loadu_ps(sr + k)));
        norm_row(yr, D, G2w, B2n, e2, rms, O + (t * B + r0 + r) * D);
      }
    }
  });
  return out;
}

// The two GEMMs of a per-token SwiGLU (gate/up, the gate columns first, then down; both
// bias-free), checked to chain `dim` = width -> 2 Hd, Hd -> width. Per thread, `Rows` holds a
// row block's buffers: the u8 input rows (aq, scales sx) the caller fills, the gate/up
// products, Swish(gate) * up and its u8 copy, and the down projection's output.
struct SwiGLUGemms {
  Gemm gu, down;
  int64_t width, H2, Hd;

  SwiGLUGemms(const char* op, const char* dim, int64_t width_, int64_t T, const at::Tensor& wgu,
              const at::Tensor& cgu, const at::Tensor& sgu, int64_t kgu, const at::Tensor& wd,
              const at::Tensor& cd, const at::Tensor& sd, int64_t kd)
      : gu(op, "w_gate_up", wgu, cgu, sgu, at::empty({0}), kgu, T),
        down(op, "w_down", wd, cd, sd, at::empty({0}), kd, T),
        width(width_),
        H2(gu.n),
        Hd(gu.n / 2) {
    TORCH_CHECK(H2 % 2 == 0 && gu.k == width && down.k == Hd && down.n == width, op,
                ": the weights' shapes (", gu.k, " x ", gu.n, ", ", down.k, " x ", down.n,
                ") do not chain ", dim, " = ", width, " -> 2 Hd, Hd -> ", dim);
  }

  struct Rows {
    int64_t kp;
    std::vector<uint8_t> aq, hq;
    std::vector<float> sx, g, h, sh;
    Rows(const SwiGLUGemms& f, int64_t row_block)
        : kp(f.gu.kp),
          aq(round_up(row_block, 16) * f.gu.kp),
          hq(round_up(row_block, 16) * f.down.kp),
          sx(row_block),
          g(row_block * f.H2),
          h(row_block * f.Hd),
          sh(row_block) {}
    // input row r: its u8 copy and scale from a normed fp32 row of the stage's width
    void quantize(int64_t r, const float* row, int64_t width) {
      sx[r] = quantize_row(row, width, aq.data() + r * kp, kp);
    }
  };

  // The M rows of b.aq (token t) through both GEMMs into out (M x width, leading dimension ldo).
  void run(int64_t t, Rows& b, int64_t M, float* out, int64_t ldo) const {
    gu.run(t, b.aq.data(), b.sx.data(), M, b.g.data(), H2);
    for (int64_t r = 0; r < M; ++r) {  // Swish(gate) * up, its u8 copy
      const float* gr = b.g.data() + r * H2;
      float* hr = b.h.data() + r * Hd;
      for (int64_t k = 0; k < Hd; k += 16) {
        const __mmask16 mk = tail_mask(Hd - k);
        _mm512_mask_storeu_ps(hr + k, mk, swiglu(_mm512_maskz_loadu_ps(mk, gr + k),
                                                 _mm512_maskz_loadu_ps(mk, gr + Hd + k)));
      }
      b.sh[r] = quantize_row(hr, Hd, b.hq.data() + r * down.kp, down.kp);
    }
    down.run(t, b.hq.data(), b.sh.data(), M, out, ldo);
  }
};

at::Tensor int8_swiglu_stage(const at::Tensor& z, const at::Tensor& res, const at::Tensor& g,
                             double eps, const at::Tensor& wgu, const at::Tensor& cgu,
                             const at::Tensor& sgu, int64_t kgu, const at::Tensor& wd,
                             const at::Tensor& cd, const at::Tensor& sd, int64_t kd,
                             int64_t row_block) {
  const char* op = "int8_swiglu_stage";
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.dim() == 3, op, ": z must be fp32 [T, B, W]");
  const auto zc = z.contiguous(), rc = res.contiguous();
  TORCH_CHECK(rc.scalar_type() == at::kFloat && rc.sizes() == zc.sizes(), op,
              ": the residual must be fp32 and z's shape");
  const int64_t T = zc.size(0), B = zc.size(1), W = zc.size(2);
  TORCH_CHECK(W % 16 == 0, op, ": W = ", W, " must be a multiple of 16");
  TORCH_CHECK(row_block > 0, op, ": row_block must be positive");
  const SwiGLUGemms f(op, "W", W, T, wgu, cgu, sgu, kgu, wd, cd, sd, kd);
  check_f32(g, op, "norm weight", W);
  auto out = at::empty_like(zc);
  if (B == 0) return out;
  const int64_t nrb = (B + row_block - 1) / row_block;
  const float *Z = zc.data_ptr<float>(), *R = rc.data_ptr<float>(), *Gw = g.data_ptr<float>();
  const float e = static_cast<float>(eps);
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T * nrb, 1, [&](int64_t begin, int64_t end) {
    SwiGLUGemms::Rows b(f, row_block);
    std::vector<float> s(W);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nrb, r0 = (i % nrb) * row_block, M = std::min(row_block, B - r0);
      for (int64_t r = 0; r < M; ++r) {  // RMSNorm(z), its u8 copy
        norm_row(Z + (t * B + r0 + r) * W, W, Gw, nullptr, e, true, s.data());
        b.quantize(r, s.data(), W);
      }
      float* o = O + (t * B + r0) * W;
      f.run(t, b, M, o, W);
      const float* rr = R + (t * B + r0) * W;
      for (int64_t k = 0; k < M * W; k += 16)  // + the residual
        _mm512_storeu_ps(o + k, _mm512_add_ps(_mm512_loadu_ps(o + k), _mm512_loadu_ps(rr + k)));
    }
  });
  return out;
}

// UniMixer's FFN sub-layer on its two SiameseNorm streams, [B, T, D] fp32 each (not
// token-major: the rows of token t are read and written in place, stride T * D):
//   O = W_down,t (Swish(W_gate,t z) * W_up,t z),  z = Xbar + RMSNorm_y(Ybar)
//   Xbar' = RMSNorm_x(Xbar + O),  Ybar' = Ybar + O
// one pass per (token, row block), the GEMMs in int8 (bias-free; gate columns first).
std::tuple<at::Tensor, at::Tensor> int8_unimixer_ffn(
    const at::Tensor& xbar, const at::Tensor& ybar, const at::Tensor& gy, double eps_y,
    const at::Tensor& gx, double eps_x, const at::Tensor& wgu, const at::Tensor& cgu,
    const at::Tensor& sgu, int64_t kgu, const at::Tensor& wd, const at::Tensor& cd,
    const at::Tensor& sd, int64_t kd, int64_t row_block) {
  const char* op = "int8_unimixer_ffn";
  TORCH_CHECK(xbar.scalar_type() == at::kFloat && xbar.dim() == 3, op,
              ": xbar must be fp32 [B, T, D]");
  const auto xc = xbar.contiguous(), yc = ybar.contiguous();
  TORCH_CHECK(yc.scalar_type() == at::kFloat && yc.sizes() == xc.sizes(), op,
              ": ybar must be fp32 and xbar's shape");
  const int64_t B = xc.size(0), T = xc.size(1), D = xc.size(2);
  TORCH_CHECK(D % 16 == 0, op, ": D = ", D, " must be a multiple of 16");
  TORCH_CHECK(row_block > 0, op, ": row_block must be positive");
  const SwiGLUGemms f(op, "D", D, T, wgu, cgu, sgu, kgu, wd, cd, sd, kd);
  check_f32(gy, op, "ybar norm weight", D);
  check_f32(gx, op, "xbar norm weight", D);
  auto xo = at::empty_like(xc), yo = at::empty_like(yc);
  if (B == 0) return {xo, yo};
  const int64_t nrb = (B + row_block - 1) / row_block;
  const float *X = xc.data_ptr<float>(), *Y = yc.data_ptr<float>();
  const float *Gy = gy.data_ptr<float>(), *Gx = gx.data_ptr<float>();
  const float ey = static_cast<float>(eps_y), ex = static_cast<float>(eps_x);
  float *XO = xo.data_ptr<float>(), *YO = yo.data_ptr<float>();
  at::parallel_for(0, T * nrb, 1, [&](int64_t begin, int64_t end) {
    SwiGLUGemms::Rows b(f, row_block);
    std::vector<float> z(D), o(row_block * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nrb, r0 = (i % nrb) * row_block, M = std::min(row_block, B - r0);
      for (int64_t r = 0; r < M; ++r) {  // z = Xbar + RMSNorm_y(Ybar), its u8 copy
        const int64_t row = ((r0 + r) * T + t) * D;
        norm_row(Y + row, D, Gy, nullptr, ey, true, z.data());
        for (int64_t k = 0; k < D; k += 16)
          _mm512_storeu_ps(z.data() + k,
                           _mm512_add_ps(_mm512_loadu_ps(X + row + k), _mm512_loadu_ps(z.data() + k)));
        b.quantize(r, z.data(), D);
      }
      f.run(t, b, M, o.data(), D);
      for (int64_t r = 0; r < M; ++r) {  // Ybar + O; RMSNorm_x(Xbar + O)
        const int64_t row = ((r0 + r) * T + t) * D;
        float* orow = o.data() + r * D;
        for (int64_t k = 0; k < D; k += 16) {
          const __m512 ov = _mm512_loadu_ps(orow + k);
          _mm512_storeu_ps(YO + row + k, _mm512_add_ps(_mm512_loadu_ps(Y + row + k), ov));
          _mm512_storeu_ps(orow + k, _mm512_add_ps(_mm512_loadu_ps(X + row + k), ov));
        }
        norm_row(orow, D, Gx, nullptr, ex, true, XO + row);
      }
    }
  });
  return {xo, yo};
}

}  // namespace

// The ops' schemas; their kernels are CPU kernels (not catch-all), so that Python can give
// them fake kernels for torch.compile (kernels/cpu/__init__.py, load_library's fakes).
TORCH_LIBRARY(mixrank_int8, m) {
  m.def("available() -> bool", &available);
  m.def("gemm_backend(int kind) -> int", &gemm_backend);
  m.def("emulated_tdpbusd() -> int", &emulated_tdpbusd);
  m.def(
      "int8_linear(Tensor x, Tensor packed, Tensor corr, Tensor scale, Tensor bias, int k, "
      "int row_block, bool relu) -> Tensor");
  m.def(
      "int8_grouped_linear(Tensor x, Tensor packed, Tensor corr, Tensor scale, Tensor bias, "
      "int k, Tensor offsets, int row_block, bool relu) -> Tensor");
  m.def(
      "int8_rankmixer_block(Tensor x, Tensor g1, Tensor be1, float eps1, Tensor w1, Tensor c1, "
      "Tensor s1, Tensor b1, int k1, Tensor w2, Tensor c2, Tensor s2, Tensor b2, int k2, "
      "Tensor g2, Tensor be2, float eps2, bool rms, int row_block) -> Tensor");
  m.def(
      "int8_swiglu_stage(Tensor z, Tensor res, Tensor g, float eps, Tensor wgu, Tensor cgu, "
      "Tensor sgu, int kgu, Tensor wd, Tensor cd, Tensor sd, int kd, int row_block) -> Tensor");
  m.def(
      "int8_unimixer_ffn(Tensor xbar, Tensor ybar, Tensor gy, float eps_y, Tensor gx, "
      "float eps_x, Tensor wgu, Tensor cgu, Tensor sgu, int kgu, Tensor wd, Tensor cd, "
      "Tensor sd, int kd, int row_block) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mixrank_int8, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_grouped_linear", &int8_grouped_linear);
  m.impl("int8_rankmixer_block", &int8_rankmixer_block);
  m.impl("int8_swiglu_stage", &int8_swiglu_stage);
  m.impl("int8_unimixer_ffn", &int8_unimixer_ffn);
}
