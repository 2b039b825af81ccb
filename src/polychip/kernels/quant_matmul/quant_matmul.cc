// Weight-only matmul for CPUs with AVX-512: y[M, N] = x[M, K] . w[N, K]^T (* scale[N]), float32 activations
// and output, weights stored output-major (model/quant.py's QArray layout) as
//   int8 with one float32 scale per output channel (Int8Matmul),
//   bfloat16 bit patterns in uint16, no scale (Bf16Matmul), or
//   float32, no scale (F32Matmul: float32 weights re-laid out output-major for CPU decoding).
// Each 16 weights are widened to float32 in registers (int8: sign-extend + convert; bfloat16: zero-extend
// + shift left 16) and fused-multiplied into float32 accumulators: the weights are read once, at their
// stored width, and never written out in float32, which XLA's CPU backend does not manage for a fused
// convert + dot at few rows (cpu_ffi.py has the figures). For large weights the output rows are split over
// helper threads (Helpers; as many as XLA's intra-op pool has threads), and the weight rows ahead are
// prefetched in software. XLA FFI handlers (xla/ffi/api/ffi.h from jaxlib's headers); kernels/native.py
// builds them and cpu_ffi.py registers them.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kAhead = 2;  // blocks of weight rows prefetched ahead (see block)
// Weight bytes below which one thread does the whole product (a pool task costs a few microseconds).
constexpr int64_t kBytesPerThread = 256 * 1024;
constexpr int64_t kChunksPerThread = 2;  // output-row chunks per thread (a late thread takes fewer)

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

inline __m512 widen(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

inline __m512 widen(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __m512 widen(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// Output rows [n0, n0 + NB) of R activation rows: R * NB independent accumulators keep the FMA units busy,
// and each 16 widened weights are used R times. `end` bounds the prefetch (the caller's last row).
template <typename W, int R, int NB>
void block(const float* x, const W* w, const float* s, float* y, int64_t n0, int64_t N, int64_t K,
           const W* end) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  // Software prefetch of the weight rows kAhead blocks ahead, spread over this block's k steps (each step
  // consumes NB * 16 weights, so it fetches that many bytes of the block ahead). One core's demand misses
  // alone streamed about 8 GB/s here (the interleaved rows defeat the hardware prefetcher); with the
  // prefetch, about 20 GB/s. Into L2, not L1: kAhead float32 blocks of a 1536-wide row are 98 KB, twice
  // L1, so an L1 prefetch was evicted before use (SmolLM2's float32 decode matmuls: 22.1 -> 20.9 ms).
  constexpr int64_t kStep = NB * 16 * (int64_t)sizeof(W);
  const char* ahead = reinterpret_cast<const char*>(w + (n0 + kAhead * NB) * K);
  const char* stop = reinterpret_cast<const char*>(end);
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 m = tail_mask(K - k);
    for (const char* p = ahead + (k / 16) * kStep; p < ahead + (k / 16 + 1) * kStep && p < stop; p += 64)
      _mm_prefetch(p, _MM_HINT_T1);
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
void rows(const float* x, const W* w, const float* s, float* y, int64_t N, int64_t K, int64_t lo, int64_t hi,
          const W* end) {
  constexpr int NB = R == 1 ? 8 : 4;
  int64_t n = lo;
  for (; n + NB <= hi; n += NB) block<W, R, NB>(x, w, s, y, n, N, K, end);
  for (; n < hi; ++n) block<W, R, 1>(x, w, s, y, n, N, K, end);
}

// Output columns [lo, hi) of all M rows, kTile weight rows at a time: every group of activation rows passes
// over a tile while it is in L1, so the weights stream from memory once whatever M is (M/4 passes over
// every weight made a 16-row float32 step read its weights four times).
template <typename W>
void columns(const float* x, const W* w, const float* s, float* y, int64_t M, int64_t N, int64_t K, int64_t lo,
             int64_t hi) {
  constexpr int kRows = 4;  // activation rows sharing one pass over a tile
  constexpr int64_t kTile = 8;
  const W* end = w + hi * K;
  for (int64_t n = lo; n < hi; n += kTile) {
    const int64_t t = std::min(hi, n + kTile);
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) rows<W, kRows>(x + m * K, w, s, y + m * N, N, K, n, t, end);
    for (; m < M; ++m) rows<W, 1>(x + m * K, w, s, y + m * N, N, K, n, t, end);
  }
}

// Chunks of output columns, claimed from a counter by the caller and by helper threads alike. The caller
// waits only for chunks that some running thread has claimed, so it never waits on a thread that has not
// started (a busy or sleeping helper cannot stall it beyond its own share); a helper that arrives after the
// last chunk was claimed finds nothing left and never calls the work (whose pointers are the caller's).
struct Split {
  std::function<void(int64_t, int64_t)> work;  // output columns [lo, hi)
  int64_t n, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};
  Split(std::function<void(int64_t, int64_t)> w, int64_t n_, int64_t chunk_)
      : work(std::move(w)), n(n_), chunk(chunk_), chunks((n_ + chunk_ - 1) / chunk_) {}
  void drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      work(c * chunk, std::min(n, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helper threads that spin for a short while after each job before sleeping. XLA's intra-op pool wakes a
// sleeping thread per task (tens of microseconds), longer than most decode matmuls take, so with it the
// caller had done every chunk before the helper started (SmolLM2 int8 decode: no gain from a second core).
// A helper that is still spinning from the previous matmul joins at once. The spin is bounded (kSpin), so
// idle helpers sleep on a condition variable and cost nothing between requests.
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* h = new Helpers();  // never destroyed: threads outlive static destruction order
    return *h;
  }
  // Run split on the caller and up to `n` helpers (started on first need); returns when all chunks are done.
  void run(const std::shared_ptr<Split>& split, int64_t n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while ((int64_t)threads_.size() < n) threads_.emplace_back([this] { loop(); });
      job_ = split;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    split->drain();
    while (split->done.load(std::memory_order_acquire) < split->chunks) _mm_pause();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(300);

  void loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        for (int i = 0; i < 64; ++i) _mm_pause();
      std::shared_ptr<Split> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      job->drain();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Split> job_;
  std::vector<std::thread> threads_;
};

// Threads: at most XLA's intra-op pool size (the schedulable CPUs), at most max_threads when that is > 0
// (cpu_ffi.py: POLYCHIP_CPU_KERNEL_THREADS), and one per kBytesPerThread of weights.
template <typename W>
ffi::Error matmul(ffi::ThreadPool pool, int32_t max_threads, const float* x, const W* w, const float* s, float* y,
                  int64_t M, int64_t N, int64_t K) {
  int64_t threads = std::min<int64_t>(pool.num_threads(), N * K * (int64_t)sizeof(W) / kBytesPerThread);
  if (max_threads > 0) threads = std::min<int64_t>(threads, max_threads);
  if (threads <= 1) {
    columns(x, w, s, y, M, N, K, 0, N);
    return ffi::Error::Success();
  }
  const int64_t per = (N + threads * kChunksPerThread - 1) / (threads * kChunksPerThread);
  auto work = [=](int64_t lo, int64_t hi) { columns(x, w, s, y, M, N, K, lo, hi); };
  Helpers::get().run(std::make_shared<Split>(work, N, (per + 7) / 8 * 8), threads - 1);
  return ffi::Error::Success();
}

bool bad_shapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd) {
  return xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1];
}

}  // namespace

static ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, int32_t max_threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                                 ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  if (bad_shapes(x.dimensions(), q.dimensions()) || scale.dimensions()[0] != q.dimensions()[0])
    return ffi::Error::InvalidArgument("quant_matmul: x [M, K], q [N, K], scale [N] expected");
  return matmul(pool, max_threads, x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), x.dimensions()[0],
                q.dimensions()[0], x.dimensions()[1]);
}

template <ffi::DataType T>
static ffi::Error UnscaledImpl(ffi::ThreadPool pool, int32_t max_threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                               ffi::ResultBuffer<ffi::F32> y) {
  if (bad_shapes(x.dimensions(), w.dimensions()))
    return ffi::Error::InvalidArgument("quant_matmul: x [M, K], w [N, K] expected");
  return matmul(pool, max_threads, x.typed_data(), w.typed_data(), nullptr, y->typed_data(), x.dimensions()[0],
                w.dimensions()[0], x.dimensions()[1]);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int32_t>("max_threads")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The binding of the unscaled kernels: x float32 [M, K] and weights of type T [N, K].
template <ffi::DataType T>
static auto UnscaledBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Attr<int32_t>("max_threads")
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>();  // `template`: the binding type depends on T here
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16Matmul, UnscaledImpl<ffi::U16>, UnscaledBinding<ffi::U16>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(F32Matmul, UnscaledImpl<ffi::F32>, UnscaledBinding<ffi::F32>());
