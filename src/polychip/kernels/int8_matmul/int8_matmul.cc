// Weight-only int8 matmul for CPUs with AVX-512: y[M, N] = (x[M, K] . q[N, K]^T) * scale[N], float32
// activations and output, int8 weights stored output-major (model/quant.py's QArray layout), one scale per
// output channel. Each 16 weights are widened int8 -> int32 -> float32 in registers and fused-multiplied into
// float32 accumulators: the weights are read once, as bytes, and never written out in float32, which is what
// XLA's CPU backend does not manage for a fused convert + dot at few rows (cpu_ffi.py has the figures).
// An XLA FFI handler (xla/ffi/api/ffi.h from jaxlib's headers); cpu_ffi.py builds and registers it.
#include <immintrin.h>
#include <cstdint>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
constexpr int kRows = 4;  // activation rows sharing one pass over a weight row

inline __m512 load_w(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// R activation rows x NB weight rows per pass: R * NB independent accumulators keep the FMA units busy;
// each 16 int8 weights are widened once and used R times.
template <int R, int NB>
void block(const float* x, const int8_t* q, const float* s, float* y, int64_t n0, int64_t N, int64_t K) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 m = (K - k) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * K + k);
    for (int b = 0; b < NB; ++b) {
      __m512 w = load_w(q + (n0 + b) * K + k, m);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(w, xv[r], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) y[r * N + n0 + b] = _mm512_reduce_add_ps(acc[r][b]) * s[n0 + b];
}

template <int R>
void rows(const float* x, const int8_t* q, const float* s, float* y, int64_t N, int64_t K) {
  constexpr int NB = R == 1 ? 8 : 4;
  int64_t n = 0;
  for (; n + NB <= N; n += NB) block<R, NB>(x, q, s, y, n, N, K);
  for (; n < N; ++n) block<R, 1>(x, q, s, y, n, N, K);
}
}  // namespace

static ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                                 ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || xd[1] != qd[1]) return ffi::Error::InvalidArgument("int8_matmul: shapes");
  const int64_t M = xd[0], K = xd[1], N = qd[0];
  const float* X = x.typed_data();
  const int8_t* Q = q.typed_data();
  const float* S = scale.typed_data();
  float* Y = y->typed_data();
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) rows<kRows>(X + m * K, Q, S, Y + m * N, N, K);
  for (; m < M; ++m) rows<1>(X + m * K, Q, S, Y + m * N, N, K);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
