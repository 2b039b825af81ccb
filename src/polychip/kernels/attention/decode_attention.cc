// One-token decode attention for CPUs with AVX-512, over a contiguous KV cache read in place:
//   q [B, H, D], k/v [B, S, K, D] float32, q_offset [B] int32 (the query's position), kv_lengths [B] int32
//   -> o [B, H, D] float32.
// Key s is seen by the query of row b when s <= q_offset[b] (causal), s < kv_lengths[b] and, with a window
// W > 0, s > q_offset[b] - W: the semantics of attention/reference.py for one query. Only the keys seen are
// read (XLA's path scores the whole cache and first copied it into head-major order, every layer and step).
// Scores and the softmax are float32; exp is a degree-6 polynomial after range reduction (relative error
// about 2e-7, like expf). A row with no key seen gets zeros, like the reference.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// e^x for x <= 0 (scores minus their max): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to
// degree 6 (Horner), then scaled by 2^n. Below -87 the result underflows to 0 as expf's does.
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __mmask16 m = tail_mask(D - d);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// The G query heads of one KV head: keys [lo, hi) of a [S, K, D] cache at head kh.
void attend(const float* q, const float* k, const float* v, float* o, int64_t G, int64_t K, int64_t D, int64_t kh,
            int64_t lo, int64_t hi, float scale, std::vector<float>& p) {
  const int64_t n = hi - lo;
  for (int64_t g = 0; g < G; ++g) std::fill(o + g * D, o + (g + 1) * D, 0.0f);
  if (n <= 0) return;
  p.resize(n);
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float mx = -INFINITY;
    for (int64_t s = 0; s < n; ++s) {
      p[s] = dot(qg, k + ((lo + s) * K + kh) * D, D) * scale;
      mx = std::max(mx, p[s]);
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 16) {
      __mmask16 m = tail_mask(n - s);
      __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.data() + s), _mm512_set1_ps(mx)));
      _mm512_mask_storeu_ps(p.data() + s, m, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(total);
    float* og = o + g * D;
    for (int64_t d = 0; d < D; d += 16) {
      __mmask16 m = tail_mask(D - d);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t s = 0; s < n; ++s)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), _mm512_maskz_loadu_ps(m, v + ((lo + s) * K + kh) * D + d), acc);
      _mm512_mask_storeu_ps(og + d, m, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
    }
  }
}

}  // namespace

static ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                      ffi::Buffer<ffi::S32> q_offset, ffi::Buffer<ffi::S32> kv_lengths, int64_t window,
                                      float scale, ffi::ResultBuffer<ffi::F32> o) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      kd[0] != qd[0] || kd[3] != qd[2] ||
      qd[1] % kd[2] != 0 || q_offset.dimensions()[0] != qd[0] || kv_lengths.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument("decode_attention: q [B, H, D], k/v [B, S, K, D], q_offset/kv_lengths [B]");
  const int64_t B = qd[0], H = qd[1], D = qd[2], S = kd[1], K = kd[2], G = H / K;
  std::vector<float> p;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pos = q_offset.typed_data()[b];
    int64_t hi = std::min<int64_t>({pos + 1, (int64_t)kv_lengths.typed_data()[b], S});
    int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    for (int64_t kh = 0; kh < K; ++kh)
      attend(q.typed_data() + (b * H + kh * G) * D, k.typed_data() + b * S * K * D, v.typed_data() + b * S * K * D,
             o->typed_data() + (b * H + kh * G) * D, G, K, D, kh, lo, hi, scale, p);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
