// y [rows, out] float32 = x [rows, in] float32 @ W, W as symmetric int8 codes stored transposed, w [out, in]
// (the input axis contiguous), with float32 scales [out, in / group] (the weight is code * scale).
//
// As llama.cpp's q8_0 x q8_0 dot: each row of x is quantized to int8 blocks of 32 (scale d = max|x| / 127,
// code = round(x / d)), the products of a block are summed in integers, and each block adds
// d_w * d_x * integer sum to a float accumulator. With AVX2 a block is 32 bytes: |w| (_mm256_sign_epi8) times
// x with w's sign by _mm256_maddubs_epi16 (unsigned x signed -> int16 pairs), _mm256_madd_epi16 to int32, one
// conversion and one FMA. Output rows are split in chunks of 32 over the caller and XLA's intra-op thread pool
// (each chunk streams its weight rows in order); every x row is multiplied with a weight row while it is in L1.
//
// Built by kernels/cpu_qmatvec.py: c++ -O3 -march=native -shared -fPIC -I<jax.ffi.include_dir()>.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static constexpr int64_t kBlock = 32;

// One row of x [in] -> codes [in] int8 and one scale per block of 32 [in / 32] (plain C++: the same rounding,
// round half to even, with or without AVX2).
static void quantize_row(const float* x, int64_t in, int8_t* codes, float* scales) {
  for (int64_t b = 0; b < in / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    scales[b] = d;
    for (int64_t i = 0; i < kBlock; ++i) codes[b * kBlock + i] = static_cast<int8_t>(std::nearbyint(xb[i] * id));
  }
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// sum_b wscale[b * 32 / group] * xscale[b] * sum_i w[b, i] * xq[b, i] over the in / 32 blocks.
static float dot_row(const int8_t* w, const float* wscale, const int8_t* xq, const float* xscale, int64_t in,
                     int64_t group) {
  const int64_t blocks = in / kBlock, per_group = group / kBlock;
#ifdef __AVX2__
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  auto block = [&](int64_t b) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlock));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
    const __m256i prod16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod16, ones));
    return _mm256_mul_ps(_mm256_set1_ps(wscale[b / per_group] * xscale[b]), sum);
  };
  for (; b + 1 < blocks; b += 2) {  // two accumulators: independent FMA chains
    acc0 = _mm256_add_ps(acc0, block(b));
    acc1 = _mm256_add_ps(acc1, block(b + 1));
  }
  if (b < blocks) acc0 = _mm256_add_ps(acc0, block(b));
  return hsum(_mm256_add_ps(acc0, acc1));
#else
  float total = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t sum = 0;
    for (int64_t i = 0; i < kBlock; ++i) sum += int32_t(w[b * kBlock + i]) * int32_t(xq[b * kBlock + i]);
    total += wscale[b / per_group] * xscale[b] * float(sum);
  }
  return total;
#endif
}

static constexpr int64_t kChunk = 32;  // output rows a worker claims at a time

// Shared by the caller and the tasks it schedules; a task that starts after all chunks are claimed finds nothing
// to do and only touches this (kept alive by its shared_ptr), never the buffers.
struct Work {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
};

static ffi::Error q8_matvec_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                                 ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("q8_matvec: x, w and scales must be 2-D");
  }
  const int64_t rows = xd[0], in = xd[1], out = wd[0];
  if (wd[1] != in || sd[0] != out || in % kBlock != 0 || sd[1] == 0 || in % sd[1] != 0 ||
      (in / sd[1]) % kBlock != 0) {
    return ffi::Error::InvalidArgument("q8_matvec: shapes x [rows, in], w [out, in], scales [out, in / group], "
                                       "in and group multiples of 32");
  }
  const int64_t group = in / sd[1], blocks = in / kBlock;
  std::vector<int8_t> xq(rows * in);
  std::vector<float> xs(rows * blocks);
  for (int64_t r = 0; r < rows; ++r) quantize_row(x.typed_data() + r * in, in, &xq[r * in], &xs[r * blocks]);
  const int8_t* wp = w.typed_data();
  const float* sp = scales.typed_data();
  float* yp = y->typed_data();
  const int8_t* xqp = xq.data();
  const float* xsp = xs.data();
  const int64_t groups = sd[1];
  auto work = std::make_shared<Work>();
  work->chunks = (out + kChunk - 1) / kChunk;
  // Claims chunks until none are left (each claimed chunk is finished by its claimer, then counted as done).
  auto run = [=](Work& state) {
    for (int64_t c; (c = state.next.fetch_add(1)) < state.chunks;) {
      const int64_t end = std::min(out, (c + 1) * kChunk);
      for (int64_t o = c * kChunk; o < end; ++o) {
        for (int64_t r = 0; r < rows; ++r) {
          yp[r * out + o] = dot_row(wp + o * in, sp + o * groups, xqp + r * in, xsp + r * blocks, in, group);
        }
      }
      state.done.fetch_add(1);
    }
  };
  // XLA's intra-op threads (awake while the program runs) help; the caller works too, then waits for chunks
  // others claimed. Nothing waits for a task to start, so a busy or absent pool cannot deadlock.
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([work, run]() { run(*work); });
  }
  run(*work);
  while (work->done.load() < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Q8Matvec, q8_matvec_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
