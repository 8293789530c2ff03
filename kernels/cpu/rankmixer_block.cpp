// A whole RankMixer block (inference, bf16, CPU) in one pass per (token, row block):
//
//   S  = Norm1(TokenMixing(X) + X)                       (H = T heads)
//   Y  = Norm2(W2_t GELU(W1_t S_t + b1_t) + b2_t + S_t)   (per token t)
//
// on token-major X [T, B, D]. The two per-token GEMMs run on oneDNN's AMX micro-kernel
// (at::native::cpublas::brgemm, the one PyTorch's CPU flash attention and Inductor's C++ GEMM
// template use) with fp32 accumulators; everything else is the GEMMs' prologue and epilogues:
// the mixing gather, the residual and Norm1 build a row block of S in a thread-local buffer,
// bias + exact GELU turn each 64-column accumulator block into the bf16 hidden row block,
// and b2 + residual + Norm2 finish the output rows. The hidden tensor [rows, kD] never leaves
// the core's L2 (the eager path writes and re-reads [T, B, kD] through memory three times).
//
// Rounding differs from the eager path only in where bf16 rounding happens: here the mixed sum,
// the accumulators and the pre-norm sums stay fp32 (the eager path rounds each to bf16).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using at::BFloat16;
constexpr int64_t NB = 64;  // brgemm's packed B block: 64 columns (oneDNN ukernel limit)

inline __m512 load_bf16(const BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline void store_bf16(BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// exact GELU, 0.5 v (1 + erf(v / sqrt 2)), with erf from Abramowitz & Stegun 7.1.28
// (|error| <= 3e-7, far below bf16's resolution): erf(u) = 1 - (1 + a1 u + ... + a6 u^6)^-16.
inline __m512 gelu(__m512 v) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 u = _mm512_mul_ps(_mm512_andnot_ps(sign, v), _mm512_set1_ps(0.70710678118654752f));
  u = _mm512_min_ps(u, _mm512_set1_ps(10.0f));
  __m512 p = _mm512_set1_ps(0.0000430638f);
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0002765672f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0001520143f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0092705272f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0422820123f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0705230784f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.0f));
  __m512 r = _mm512_rcp14_ps(p);  // one Newton step: ~2^-28 relative
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(p, r, _mm512_set1_ps(2.0f)));
  r = _mm512_mul_ps(r, r);  // r^2
  r = _mm512_mul_ps(r, r);  // r^4
  r = _mm512_mul_ps(r, r);  // r^8
  r = _mm512_mul_ps(r, r);  // r^16
  __m512 e = _mm512_sub_ps(_mm512_set1_ps(1.0f), r);             // erf(|u|)
  e = _mm512_or_ps(e, _mm512_and_ps(v, sign));                   // erf(u) with v's sign
  __m512 half_v = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half_v, e, half_v);
}

// Norm over one fp32 row of D (D % 16 == 0) into bf16: LayerNorm (gamma, beta) or RMSNorm.
inline void norm_row(const float* m, int64_t D, const float* g, const float* b, float eps,
                     bool rms, BFloat16* out) {
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
  }
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

// w [T, K, N] bf16 -> [T, N/64, K*64]: each 64-column block in brgemm's VNNI layout.
at::Tensor pack_weight(const at::Tensor& w) {
  check_bf16(w, "w", 3);
  const int64_t T = w.size(0), K = w.size(1), N = w.size(2);
  TORCH_CHECK(N % NB == 0 && K % 2 == 0, "pack_weight: N % 64 and K % 2 must be 0, got K=", K,
              " N=", N);
  TORCH_CHECK(at::native::cpublas::could_pack(at::kBFloat16),
              "pack_weight: this CPU has no AMX bf16 (oneDNN brgemm packing unavailable)");
  auto out = at::empty({T, N / NB, K * NB}, w.options());
  const BFloat16* src = w.data_ptr<BFloat16>();
  BFloat16* dst = out.data_ptr<BFloat16>();
  for (int64_t i = 0; i < T * (N / NB); ++i) {
    const int64_t t = i / (N / NB), nb = i % (N / NB);
    at::native::cpublas::pack(K, NB, N, NB, at::kBFloat16, at::kBFloat16,
                              src + t * K * N + nb * NB, dst + i * K * NB);
  }
  return out;
}

bool available() { return at::native::cpublas::could_pack(at::kBFloat16); }

// x [T, B, D] bf16 (token-major); w1p = pack_weight(W1 [T, D, Hd]), w2p = pack_weight(W2 [T, Hd, D]);
// b1 [T, Hd], b2 [T, D], norm weights/biases [D] as float32 (biases may be empty for RMSNorm).
at::Tensor rankmixer_block(const at::Tensor& x, const at::Tensor& g1, const at::Tensor& be1,
                           double eps1, const at::Tensor& w1p, const at::Tensor& b1,
                           const at::Tensor& w2p, const at::Tensor& b2, const at::Tensor& g2,
                           const at::Tensor& be2, double eps2, bool rms, int64_t row_block) {
  check_bf16(x, "x", 3);
  check_bf16(w1p, "w1p", 3);
  check_bf16(w2p, "w2p", 3);
  const int64_t T = x.size(0), B = x.size(1), D = x.size(2);
  TORCH_CHECK(D % T == 0 && D % NB == 0 && (D / T) % 16 == 0,
              "rankmixer_block: needs D % 64 == 0 and (D / T) % 16 == 0, got T=", T, " D=", D);
  TORCH_CHECK(w1p.size(0) == T && w1p.size(2) == D * NB,
              "rankmixer_block: w1p does not match x");
  const int64_t Hd = w1p.size(1) * NB;
  TORCH_CHECK(w2p.size(0) == T && w2p.size(1) == D / NB && w2p.size(2) == Hd * NB,
              "rankmixer_block: w2p does not match w1p");
  check_f32(b1, "b1", T * Hd);
  check_f32(b2, "b2", T * D);
  check_f32(g1, "norm1 weight", D);
  check_f32(g2, "norm2 weight", D);
  if (!rms) {
    check_f32(be1, "norm1 bias", D);
    check_f32(be2, "norm2 bias", D);
  }
  TORCH_CHECK(row_block > 0, "rankmixer_block: row_block must be positive");
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
    std::vector<BFloat16> s(row_block * D), h(row_block * Hd);
    std::vector<float> m(row_block * D), c(row_block * NB), y(row_block * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nrb, r0 = (i % nrb) * row_block;
      const int64_t M = std::min(row_block, B - r0);
      // S rows: mixed token t of row b = concat_j X[j, b, t*d:(t+1)*d]; + X[t, b]; Norm1.
      // Gathered one source token j at a time: a steady 512-byte-stride stream per j.
      for (int64_t j = 0; j < T; ++j) {
        const BFloat16* src = X + (j * B + r0) * D + t * d;
        for (int64_t r = 0; r < M; ++r)
          for (int64_t k = 0; k < d; k += 16)
            _mm512_storeu_ps(m.data() + r * D + j * d + k, load_bf16(src + r * D + k));
      }
      for (int64_t r = 0; r < M; ++r) {
        float* mr = m.data() + r * D;
        const BFloat16* xt = X + (t * B + r0 + r) * D;
        for (int64_t k = 0; k < D; k += 16)
          _mm512_storeu_ps(mr + k, _mm512_add_ps(_mm512_loadu_ps(mr + k), load_bf16(xt + k)));
        norm_row(mr, D, G1, BE1, e1, rms, s.data() + r * D);
      }
      // hidden = GELU(S W1_t + b1_t), 64 columns at a time
      const BFloat16* w1 = W1 + t * Hd * D;
      for (int64_t nb = 0; nb < Hd / NB; ++nb) {
        at::native::cpublas::brgemm(M, NB, D, D, NB, NB, false, s.data(), w1 + nb * D * NB,
                                    c.data());
        const float* bias = B1 + t * Hd + nb * NB;
        for (int64_t r = 0; r < M; ++r)
          for (int64_t k = 0; k < NB; k += 16) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(c.data() + r * NB + k),
                                     _mm512_loadu_ps(bias + k));
            store_bf16(h.data() + r * Hd + nb * NB + k, gelu(v));
          }
      }
      // Y = hidden W2_t (fp32, 64 columns at a time), then + b2_t + S, Norm2
      const BFloat16* w2 = W2 + t * D * Hd;
      for (int64_t nb = 0; nb < D / NB; ++nb)
        at::native::cpublas::brgemm(M, NB, Hd, Hd, NB, D, false, h.data(), w2 + nb * Hd * NB,
                                    y.data() + nb * NB);
      const float* bias2 = B2 + t * D;
      for (int64_t r = 0; r < M; ++r) {
        float* yr = y.data() + r * D;
        const BFloat16* sr = s.data() + r * D;
        for (int64_t k = 0; k < D; k += 16)
          _mm512_storeu_ps(yr + k, _mm512_add_ps(_mm512_loadu_ps(yr + k),
                                                 _mm512_add_ps(_mm512_loadu_ps(bias2 + k),
                                                               load_bf16(sr + k))));
        norm_row(yr, D, G2, BE2, e2, rms, O + (t * B + r0 + r) * D);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

TORCH_LIBRARY(mixrank_cpu, m) {
  m.def("available() -> bool", &available);
  m.def("pack_weight(Tensor w) -> Tensor", &pack_weight);
  m.def(
      "rankmixer_block(Tensor x, Tensor g1, Tensor be1, float eps1, Tensor w1p, Tensor b1, "
      "Tensor w2p, Tensor b2, Tensor g2, Tensor be2, float eps2, bool rms, int row_block) -> "
      "Tensor",
      &rankmixer_block);
}
