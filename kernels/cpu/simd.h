// AVX-512 fp32 activations shared by the CPU kernels (mixer_blocks.cpp: bf16 on AMX;
// int8_blocks.cpp: int8 on AVX512-VNNI). AVX-512F only.
#pragma once

#include <immintrin.h>

namespace mixrank_simd {

// exact GELU, 0.5 v (1 + erf(v / sqrt 2)), with erf from Abramowitz & Stegun 7.1.28
// (|error| <= 3e-7, far below bf16's resolution): erf(u) = 1 - (1 + a1 u + ... + a6 u^6)^-16,
// here with u = |v| / sqrt 2 folded into the coefficients (c_i = a_i / sqrt(2)^i).
inline __m512 gelu(__m512 v) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 u = _mm512_min_ps(_mm512_andnot_ps(sign, v), _mm512_set1_ps(14.0f));  // |v|
  __m512 p = _mm512_set1_ps(0.0000430638f / 8.0f);
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0002765672f / 5.656854249f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0001520143f / 4.0f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0092705272f / 2.828427125f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0422820123f / 2.0f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.0705230784f / 1.414213562f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.0f));
  __m512 r = _mm512_rcp14_ps(p);  // one Newton step: ~2^-28 relative
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(p, r, _mm512_set1_ps(2.0f)));
  r = _mm512_mul_ps(r, r);  // r^2
  r = _mm512_mul_ps(r, r);  // r^4
  r = _mm512_mul_ps(r, r);  // r^8
  r = _mm512_mul_ps(r, r);  // r^16
  __m512 e = _mm512_sub_ps(_mm512_set1_ps(1.0f), r);  // erf(|u|)
  e = _mm512_or_ps(e, _mm512_and_ps(v, sign));        // erf(u) with v's sign
  __m512 half_v = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half_v, e, half_v);
}

// exp(x) in AVX-512: 2^n * e^r with n = round(x / ln 2), r reduced in two steps (Cody-Waite)
// and e^r by its degree-6 Taylor polynomial (relative error ~2e-7 on |r| <= ln2 / 2).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Swish(g) * u = g * u / (1 + exp(-g)), the reciprocal with one Newton step.
inline __m512 swiglu(__m512 g, __m512 u) {
  const __m512 q = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)));
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  return _mm512_mul_ps(_mm512_mul_ps(g, u), r);
}

}  // namespace mixrank_simd
