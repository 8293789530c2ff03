// A whole RankMixer block (inference, bf16, CPU) in one pass per (token, row block):
//
//   S  = Norm1(TokenMixing(X) + X)                       (H = T heads)
//   Y  = Norm2(W2_t GELU(W1_t S_t + b1_t) + b2_t + S_t)   (per token t)
//
// on token-major X [T, B, D]. Both per-token GEMMs are written directly in AMX intrinsics
// (2x2 tiles of 16x16 fp32 accumulators, K steps of 32) and everything else is their prologue
// and epilogues on a thread-local block of 32 rows: the mixing gather, the residual and Norm1
// build the rows of S (bf16 for the GEMM; S + b2 in fp32 as the second GEMM's starting
// accumulator); the first GEMM starts from b1 in its tiles and exact GELU turns each 32x32
// accumulator block into the bf16 hidden rows, software-pipelined with the next block's tile
// multiplies; Norm2 finishes the output rows. The hidden tensor [rows, kD] never leaves the
// core's L2 (the eager path writes and re-reads [T, B, kD] through memory three times).
//
// Measured against oneDNN's AMX micro-kernel (at::native::cpublas::brgemm, the one PyTorch's
// CPU flash attention and Inductor's C++ GEMM template use) on the same data: the first GEMM
// with its GELU 5-7% faster than brgemm + a GELU pass per 64 columns; with both GEMMs (and the
// residual and b2 starting in the accumulators) the block 1.2x faster (docs/BENCHMARKS.md).
//
// The same machinery runs TokenMixer-Large's pSwiGLU stage (swiglu_stage below): RMSNorm, the
// gate/up GEMM whose 2x2 tiles pair 16 gate columns with the same 16 up columns so that
// Swish(gate) * up is the epilogue, and the down GEMM starting from the residual.
//
// Rounding differs from the eager path only in where bf16 rounding happens: here the mixed sum,
// the accumulators, the residual and the pre-norm sums stay fp32 (the eager path rounds each to
// bf16).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "amx.h"
#include "simd.h"

namespace {

using at::BFloat16;
using mixrank_amx::TileConfig;
using mixrank_amx::amx_permitted;
using mixrank_simd::exp512;
using mixrank_simd::gelu;
using mixrank_simd::swiglu;
constexpr int64_t MR = 32;  // rows per AMX block (two 16-row tiles)

inline __m512 load_bf16(const BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline void store_bf16(BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// Norm over one fp32 row of D (D % 16 == 0) into bf16: LayerNorm (gamma, beta) or RMSNorm;
// with ``out32``, also writes the normalized row + ``add`` in fp32.
inline void norm_row(const float* m, int64_t D, const float* g, const float* b, float eps,
                     bool rms, BFloat16* out, float* out32 = nullptr,
                     const float* add = nullptr) {
  __m512 acc = _mm512_setzero_ps();
  float mean = 0.f;
  if (!rms) {
    for (int64_t k = 0; k < D; k += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(m + k));
    mean = _mm512_reduce_add_ps(acc) / D;
    acc = _mm512_setzero_ps();
  }
  const __m512 vmean = _mm512_set1_ps(mean);
  for (int64_t k = 0; k < D; k += 16) {
    __m512 c = _mm512_sub_ps(_mm512_loadu_ps(m + k), vmean);
    acc = _mm512_fmadd_ps(c, c, acc);
  }
  const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / D + eps);
  const __m512 vr = _mm512_set1_ps(rstd);
  for (int64_t k = 0; k < D; k += 16) {
    __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(m + k), vmean), vr);
    c = b ? _mm512_fmadd_ps(c, _mm512_loadu_ps(g + k), _mm512_loadu_ps(b + k))
          : _mm512_mul_ps(c, _mm512_loadu_ps(g + k));
    store_bf16(out + k, c);
    if (out32) _mm512_storeu_ps(out32 + k, _mm512_add_ps(c, _mm512_loadu_ps(add + k)));
  }
}

// One K step of 32 into the 2x2 accumulators: rows 0-15 and 16-31 of A (leading dimension
// lda elements) times two packed B tiles (1 KB each, 64-byte rows).
inline void kstep(const BFloat16* a, int64_t lda, const BFloat16* b0, const BFloat16* b1) {
  _tile_loadd(4, a, lda * 2);
  _tile_loadd(5, a + 16 * lda, lda * 2);
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// The first GEMM's epilogue over rows [r0, r1) of a 32 x 32 fp32 accumulator block into bf16
// hidden rows. GELU (RankMixer): 32 hidden columns, GELU of each (the bias is already in the
// accumulator). SwiGLU (TokenMixer-Large): the left 16 columns are the gate and the right 16 the
// up projection of the same 16 hidden columns: Swish(gate) * up.
template <bool kSwiGLU>
inline void epilogue_rows(const float* c, BFloat16* h, int64_t ldh, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 lo = _mm512_load_ps(c + r * 32), hi = _mm512_load_ps(c + r * 32 + 16);
    if constexpr (kSwiGLU) {
      store_bf16(h + r * ldh, swiglu(lo, hi));
    } else {
      _mm512_storeu_si512(h + r * ldh, (__m512i)_mm512_cvtne2ps_pbh(gelu(hi), gelu(lo)));
    }
  }
}

// The first GEMM of 32 rows of S [32, D] and its activation into hidden [32, Hd]; weights packed
// as 16-column blocks [N/16][D/2][16][2]. Each step multiplies into a 32 x 32 accumulator block
// (2x2 tiles): GELU, N = Hd, column blocks 2j and 2j+1, accumulators starting from b1 (a tile
// load with row stride 0 repeats the bias row); SwiGLU, N = 2 Hd (gate then up), column blocks j
// and Hd/16 + j, no bias. The epilogue of step j-1 runs inside the K loop of step j, between
// its tile multiplies.
template <bool kSwiGLU>
void gemm1(const BFloat16* s, int64_t D, const BFloat16* w1, const float* b1, BFloat16* h,
           int64_t Hd, float* cbuf /* 2 x 32 x 32, 64-byte aligned */) {
  static const TileConfig cfg;
  _tile_loadconfig(&cfg);
  const int64_t cols = kSwiGLU ? 16 : 32;  // hidden columns per step
  const int64_t ksteps = D / 32, steps = Hd / cols, per = (32 + ksteps - 1) / ksteps;
  const int64_t tile = (D / 2) * 32;  // elements of one packed 16-column block
  for (int64_t j = 0; j <= steps; ++j) {
    const float* cprev = cbuf + ((j + 1) & 1) * 1024;
    BFloat16* hprev = h + (j - 1) * cols;
    if (j == steps) {
      epilogue_rows<kSwiGLU>(cprev, hprev, Hd, 0, 32);
      break;
    }
    if constexpr (kSwiGLU) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      const float* bias = b1 + j * 32;
      _tile_loadd(0, bias, 0);
      _tile_loadd(1, bias + 16, 0);
      _tile_loadd(2, bias, 0);
      _tile_loadd(3, bias + 16, 0);
    }
    const BFloat16* w0 = w1 + (kSwiGLU ? j : 2 * j) * tile;
    const BFloat16* w1b = w1 + (kSwiGLU ? Hd / 16 + j : 2 * j + 1) * tile;
    for (int64_t kk = 0; kk < ksteps; ++kk) {
      kstep(s + kk * 32, D, w0 + kk * 512, w1b + kk * 512);
      if (j > 0)
        epilogue_rows<kSwiGLU>(cprev, hprev, Hd, std::min<int64_t>(32, kk * per),
                               std::min<int64_t>(32, (kk + 1) * per));
    }
    float* c = cbuf + (j & 1) * 1024;
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 512, 128);
    _tile_stored(3, c + 528, 128);
  }
  _tile_release();
}

// y[32 rows, D] += hidden[32 rows, Hd] W2 for W2 packed as [D/16][Hd/2][16][2]; y (fp32) holds
// S + b2 on entry, so the residual and the bias start in the accumulators.
void gemm2(const BFloat16* h, int64_t Hd, const BFloat16* w2, float* y, int64_t D) {
  static const TileConfig cfg;
  _tile_loadconfig(&cfg);
  const int64_t ksteps = Hd / 32, tile = (Hd / 2) * 32;
  for (int64_t n = 0; n < D; n += 32) {
    float* c = y + n;
    _tile_loadd(0, c, D * 4);
    _tile_loadd(1, c + 16, D * 4);
    _tile_loadd(2, c + 16 * D, D * 4);
    _tile_loadd(3, c + 16 * D + 16, D * 4);
    const BFloat16* w0 = w2 + (n / 16) * tile;
    const BFloat16* w1b = w0 + tile;
    for (int64_t kk = 0; kk < ksteps; ++kk) {
      kstep(h + kk * 32, Hd, w0 + kk * 512, w1b + kk * 512);
    }
    _tile_stored(0, c, D * 4);
    _tile_stored(1, c + 16, D * 4);
    _tile_stored(2, c + 16 * D, D * 4);
    _tile_stored(3, c + 16 * D + 16, D * 4);
  }
  _tile_release();
}

void check_bf16(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == dim &&
                  t.is_contiguous(),
              "rankmixer_block: ", name, " must be a contiguous CPU bfloat16 tensor of ", dim,
              " dims");
}

void check_f32(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == numel,
              "rankmixer_block: ", name, " must be a contiguous CPU float32 tensor of ", numel,
              " elements");
}

}  // namespace

// w [T, K, N] bf16 -> [T, N/16, K/2, 16, 2]: per token, 16-column blocks of AMX B tiles (K in
// pairs, "VNNI"), each tile (32 K x 16 columns) 1 KB of consecutive 64-byte rows.
at::Tensor pack_tiles(const at::Tensor& w) {
  check_bf16(w, "w", 3);
  const int64_t T = w.size(0), K = w.size(1), N = w.size(2);
  TORCH_CHECK(N % 32 == 0 && K % 32 == 0, "pack_tiles: N % 32 and K % 32 must be 0, got K=", K,
              " N=", N);
  return w.view({T, K / 2, 2, N / 16, 16}).permute({0, 3, 1, 4, 2}).contiguous();
}

bool available() { return amx_permitted(); }

// x [T, B, D] bf16 (token-major); w1p = pack_tiles(W1 [T, D, Hd]), w2p = pack_tiles(W2 [T, Hd, D]);
// b1 [T, Hd], b2 [T, D], norm weights/biases [D] as float32 (biases may be empty for RMSNorm).
at::Tensor rankmixer_block(const at::Tensor& x, const at::Tensor& g1, const at::Tensor& be1,
                           double eps1, const at::Tensor& w1p, const at::Tensor& b1,
                           const at::Tensor& w2p, const at::Tensor& b2, const at::Tensor& g2,
                           const at::Tensor& be2, double eps2, bool rms, int64_t row_block) {
  check_bf16(x, "x", 3);
  check_bf16(w1p, "w1p", 5);
  check_bf16(w2p, "w2p", 5);
  const int64_t T = x.size(0), B = x.size(1), D = x.size(2);
  TORCH_CHECK(D % T == 0 && D % 32 == 0 && (D / T) % 16 == 0,
              "rankmixer_block: needs D % 32 == 0 and (D / T) % 16 == 0, got T=", T, " D=", D);
  TORCH_CHECK(w1p.size(0) == T && w1p.size(2) == D / 2 && w1p.size(3) == 16 && w1p.size(4) == 2,
              "rankmixer_block: w1p does not match x");
  const int64_t Hd = w1p.size(1) * 16;
  TORCH_CHECK(w2p.size(0) == T && w2p.size(1) == D / 16 && w2p.size(2) == Hd / 2 &&
                  w2p.size(3) == 16 && w2p.size(4) == 2,
              "rankmixer_block: w2p does not match w1p");
  check_f32(b1, "b1", T * Hd);
  check_f32(b2, "b2", T * D);
  check_f32(g1, "norm1 weight", D);
  check_f32(g2, "norm2 weight", D);
  if (!rms) {
    check_f32(be1, "norm1 bias", D);
    check_f32(be2, "norm2 bias", D);
  }
  TORCH_CHECK(row_block > 0 && row_block % MR == 0,
              "rankmixer_block: row_block must be a positive multiple of 32");
  TORCH_CHECK(amx_permitted(), "rankmixer_block: the kernel refused AMX tile state");
  auto out = at::empty_like(x);
  if (B == 0) return out;
  const int64_t d = D / T;
  const int64_t nrb = (B + row_block - 1) / row_block;
  const BFloat16* X = x.data_ptr<BFloat16>();
  const BFloat16* W1 = w1p.data_ptr<BFloat16>();
  const BFloat16* W2 = w2p.data_ptr<BFloat16>();
  const float *B1 = b1.data_ptr<float>(), *B2 = b2.data_ptr<float>();
  const float *G1 = g1.data_ptr<float>(), *G2 = g2.data_ptr<float>();
  const float* BE1 = rms ? nullptr : be1.data_ptr<float>();
  const float* BE2 = rms ? nullptr : be2.data_ptr<float>();
  BFloat16* O = out.data_ptr<BFloat16>();
  const float e1 = static_cast<float>(eps1), e2 = static_cast<float>(eps2);

  at::parallel_for(0, T * nrb, 1, [&](int64_t begin, int64_t end) {
    // zero-filled: the rows past B in the last block feed the first GEMM but are never used
    std::vector<BFloat16> s(row_block * D), h(row_block * Hd);
    std::vector<float> m(row_block * D), y(row_block * D);
    alignas(64) float cbuf[2 * 32 * 32];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nrb, r0 = (i % nrb) * row_block;
      const int64_t M = std::min(row_block, B - r0);
      // S rows: mixed token t of row b = concat_j X[j, b, t*d:(t+1)*d], plus X[t, b]; gathered
      // one source token j at a time (a steady 2*D-byte-stride stream per j); then Norm1 into
      // bf16 S and, as the second GEMM's starting accumulator, S + b2 in fp32.
      for (int64_t j = 0; j < T; ++j) {
        const BFloat16* src = X + (j * B + r0) * D + t * d;
        const BFloat16* res = X + (t * B + r0) * D + j * d;
        for (int64_t r = 0; r < M; ++r)
          for (int64_t k = 0; k < d; k += 16)
            _mm512_storeu_ps(m.data() + r * D + j * d + k,
                             _mm512_add_ps(load_bf16(src + r * D + k), load_bf16(res + r * D + k)));
      }
      for (int64_t r = 0; r < M; ++r)
        norm_row(m.data() + r * D, D, G1, BE1, e1, rms, s.data() + r * D, y.data() + r * D,
                 B2 + t * D);
      // hidden = GELU(S W1_t + b1_t); Y = S + b2_t + hidden W2_t; 32 rows at a time
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        gemm1<false>(s.data() + m0 * D, D, W1 + t * Hd * D, B1 + t * Hd, h.data() + m0 * Hd, Hd,
                     cbuf);
        gemm2(h.data() + m0 * Hd, Hd, W2 + t * D * Hd, y.data() + m0 * D, D);
      }
      for (int64_t r = 0; r < M; ++r)
        norm_row(y.data() + r * D, D, G2, BE2, e2, rms, O + (t * B + r0 + r) * D);
    }
  });
  return out;
}

// One TokenMixer-Large stage, out = R + W_down,t (Swish(W_gate,t S_t) * W_up,t S_t) with
// S = RMSNorm(Z), per token t (bias-free), on token-major Z, R [T, B, W] bf16 (R may be Z).
// wgu = pack_tiles(W_gate_up [T, W, 2 Hd]) (gate columns first), wd = pack_tiles(W_down
// [T, Hd, W]); g = the RMSNorm weight [W] in float32.
at::Tensor swiglu_stage(const at::Tensor& z, const at::Tensor& r, const at::Tensor& g,
                        double eps, const at::Tensor& wgu, const at::Tensor& wd,
                        int64_t row_block) {
  check_bf16(z, "z", 3);
  check_bf16(r, "r", 3);
  check_bf16(wgu, "wgu", 5);
  check_bf16(wd, "wd", 5);
  const int64_t T = z.size(0), B = z.size(1), W = z.size(2);
  TORCH_CHECK(r.sizes() == z.sizes(), "swiglu_stage: r must have z's shape");
  TORCH_CHECK(W % 32 == 0, "swiglu_stage: needs W % 32 == 0, got W=", W);
  TORCH_CHECK(wgu.size(0) == T && wgu.size(2) == W / 2 && wgu.size(3) == 16 && wgu.size(4) == 2 &&
                  wgu.size(1) % 4 == 0,
              "swiglu_stage: wgu does not match z");
  const int64_t Hd = wgu.size(1) * 8;  // 2 Hd / 16 blocks
  TORCH_CHECK(wd.size(0) == T && wd.size(1) == W / 16 && wd.size(2) == Hd / 2 &&
                  wd.size(3) == 16 && wd.size(4) == 2,
              "swiglu_stage: wd does not match wgu");
  check_f32(g, "norm weight", W);
  TORCH_CHECK(row_block > 0 && row_block % MR == 0,
              "swiglu_stage: row_block must be a positive multiple of 32");
  TORCH_CHECK(amx_permitted(), "swiglu_stage: the kernel refused AMX tile state");
  auto out = at::empty_like(z);
  if (B == 0) return out;
  const int64_t nrb = (B + row_block - 1) / row_block;
  const BFloat16 *Z = z.data_ptr<BFloat16>(), *R = r.data_ptr<BFloat16>();
  const BFloat16 *WGU = wgu.data_ptr<BFloat16>(), *WD = wd.data_ptr<BFloat16>();
  const float* G = g.data_ptr<float>();
  BFloat16* O = out.data_ptr<BFloat16>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T * nrb, 1, [&](int64_t begin, int64_t end) {
    std::vector<BFloat16> s(row_block * W), h(row_block * Hd);
    std::vector<float> m(W), y(row_block * W);
    alignas(64) float cbuf[2 * 32 * 32];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nrb, r0 = (i % nrb) * row_block;
      const int64_t M = std::min(row_block, B - r0);
      for (int64_t rr = 0; rr < M; ++rr) {
        const BFloat16* zr = Z + (t * B + r0 + rr) * W;
        const BFloat16* rs = R + (t * B + r0 + rr) * W;
        float* yr = y.data() + rr * W;
        for (int64_t k = 0; k < W; k += 16) {
          _mm512_storeu_ps(m.data() + k, load_bf16(zr + k));
          _mm512_storeu_ps(yr + k, load_bf16(rs + k));
        }
        norm_row(m.data(), W, G, nullptr, e, true, s.data() + rr * W);
      }
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        gemm1<true>(s.data() + m0 * W, W, WGU + t * 2 * Hd * W, nullptr, h.data() + m0 * Hd, Hd,
                    cbuf);
        gemm2(h.data() + m0 * Hd, Hd, WD + t * W * Hd, y.data() + m0 * W, W);
      }
      for (int64_t rr = 0; rr < M; ++rr) {
        const float* yr = y.data() + rr * W;
        BFloat16* o = O + (t * B + r0 + rr) * W;
        for (int64_t k = 0; k < W; k += 16) store_bf16(o + k, _mm512_loadu_ps(yr + k));
      }
    }
  });
  return out;
}

// The ops' schemas; their kernels are CPU kernels (not catch-all), so that Python can give
// them fake kernels for torch.compile (kernels/cpu/__init__.py, load_library's fakes).
TORCH_LIBRARY(mixrank_cpu, m) {
  m.def("available() -> bool", &available);
  m.def("pack_tiles(Tensor w) -> Tensor");
  m.def(
      "rankmixer_block(Tensor x, Tensor g1, Tensor be1, float eps1, Tensor w1p, Tensor b1, "
      "Tensor w2p, Tensor b2, Tensor g2, Tensor be2, float eps2, bool rms, int row_block) -> "
      "Tensor");
  m.def(
      "swiglu_stage(Tensor z, Tensor r, Tensor g, float eps, Tensor wgu, Tensor wd, "
      "int row_block) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixrank_cpu, CPU, m) {
  m.impl("pack_tiles", &pack_tiles);
  m.impl("rankmixer_block", &rankmixer_block);
  m.impl("swiglu_stage", &swiglu_stage);
}
