// Weight-only quantised matmul for CPUs with AVX-512: y[M, N] = x[M, K] . w[N, K]^T (* scale[N]), float32
// activations and output, weights stored output-major (model/quant.py's QArray layout) as
//   int8 with one float32 scale per output channel (Int8Matmul), or
//   bfloat16 bit patterns in uint16, no scale (Bf16Matmul).
// Each 16 weights are widened to float32 in registers (int8: sign-extend + convert; bfloat16: zero-extend
// + shift left 16) and fused-multiplied into float32 accumulators: the weights are read once, at their
// stored width, and never written out in float32, which XLA's CPU backend does not manage for a fused
// convert + dot at few rows (cpu_ffi.py has the figures). XLA FFI handlers (xla/ffi/api/ffi.h from
// jaxlib's headers); cpu_ffi.py builds and registers them.
#include <immintrin.h>
#include <cstdint>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

inline __m512 widen(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

inline __m512 widen(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// R activation rows x NB weight rows per pass: R * NB independent accumulators keep the FMA units busy,
// and each 16 widened weights are used R times.
template <typename W, int R, int NB>
void block(const float* x, const W* w, const float* s, float* y, int64_t n0, int64_t N, int64_t K) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 m = tail_mask(K - k);
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * K + k);
    for (int b = 0; b < NB; ++b) {
      __m512 wv = widen(w + (n0 + b) * K + k, m);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(wv, xv[r], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      float v = _mm512_reduce_add_ps(acc[r][b]);
      y[r * N + n0 + b] = s ? v * s[n0 + b] : v;
    }
}

template <typename W, int R>
void rows(const float* x, const W* w, const float* s, float* y, int64_t N, int64_t K) {
  constexpr int NB = R == 1 ? 8 : 4;
  int64_t n = 0;
  for (; n + NB <= N; n += NB) block<W, R, NB>(x, w, s, y, n, N, K);
  for (; n < N; ++n) block<W, R, 1>(x, w, s, y, n, N, K);
}

template <typename W>
ffi::Error matmul(const float* x, const W* w, const float* s, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int kRows = 4;  // activation rows sharing one pass over the weights
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) rows<W, kRows>(x + m * K, w, s, y + m * N, N, K);
  for (; m < M; ++m) rows<W, 1>(x + m * K, w, s, y + m * N, N, K);
  return ffi::Error::Success();
}

bool bad_shapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd) {
  return xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1];
}

}  // namespace

static ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                                 ffi::ResultBuffer<ffi::F32> y) {
  if (bad_shapes(x.dimensions(), q.dimensions()) || scale.dimensions()[0] != q.dimensions()[0])
    return ffi::Error::InvalidArgument("quant_matmul: x [M, K], q [N, K], scale [N] expected");
  return matmul(x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), x.dimensions()[0],
                q.dimensions()[0], x.dimensions()[1]);
}

static ffi::Error Bf16MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U16> w, ffi::ResultBuffer<ffi::F32> y) {
  if (bad_shapes(x.dimensions(), w.dimensions()))
    return ffi::Error::InvalidArgument("quant_matmul: x [M, K], w [N, K] expected");
  return matmul<uint16_t>(x.typed_data(), w.typed_data(), nullptr, y->typed_data(), x.dimensions()[0],
                          w.dimensions()[0], x.dimensions()[1]);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
