// CPU kernels for few-row products (decoding): y (M, N) = x (M, K) @ W^T with W (N, K), the N output rows split
// over torch's intra-op threads (torch's own small-M kernels use one core).
//
// Shape legend: M activation rows, K the reduction (input) dim, N output rows, nb = K / 32 activation blocks,
// ng weight groups per row (int4).
//
//   q8_linear  W int8 (N, K), scale (N,) bf16:                       w = q * scale
//   q4_linear  W the int4 file layout (N, K/2) uint8, scale and zero (N, ng) bf16, groups of G inputs
//              (the even input in the low nibble):                   w = (q - 8) * scale + zero
//   f32_rows   W fp32 (N, K), rows contiguous: AVX2 dot products
//   f32_linear W fp32, any strides (row- or column-major), through torch's own matmul per thread slice
//
// The quantized kernels write each block of 32 activations as two int8 codes per element, x ~ d * (R * hi + lo)
// with R = 254 (hi as llama.cpp's Q8_0 activations; lo the rounding residual of hi, at 1/254 of its step), so the
// activations keep about 15 bits and the error is far below bf16's, and take integer dot products of the blocks
// (AVX2 maddubs; R * (w . hi) + w . lo exact in int32), accumulated in fp32. K must be a multiple of 32 (the Python
// side checks and falls back to torch's kernels otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // activations per block
constexpr int64_t TILE = 4;  // activation rows per pass over a weight row
#ifndef PREFETCH
#define PREFETCH 4096  // bytes ahead of the weight read: more loads in flight than the hardware prefetcher keeps
#endif

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 bf16 values -> fp32 (a bf16 is the high half of an fp32)
inline __m256 bf16x8(const at::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

constexpr int R = 254;  // the weight of the high activation codes

// 32 unsigned bytes . (R * hi + lo), 32 signed bytes each, as 8 fp32 partial sums: exact (|u| <= 127, |hi|, |lo| <=
// 127: each maddubs pair stays below 2^15 and each int32 below 2^25)
inline __m256 dot2_u8s8(__m256i u, __m256i hi, __m256i lo) {
  const __m256i h = _mm256_madd_epi16(_mm256_maddubs_epi16(u, hi), _mm256_set1_epi16(R));
  const __m256i l = _mm256_madd_epi16(_mm256_maddubs_epi16(u, lo), _mm256_set1_epi16(1));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(h, l));
}

// x (M, K) fp32 -> xq (M, nb, 2, 32) int8, the hi then the lo codes of each block, and d (M, nb) fp32, the lo step:
// x ~ d * (R * hi + lo). `deinterleave`: within each block the even elements first, then the odd ones, the order of
// the int4 codes' low and high nibbles.
void quantize_activations(const float* x, int64_t M, int64_t K, int8_t* xq, float* d, bool deinterleave) {
  const int64_t nb = K / QK;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * QK;
      float amax = 0.f;
      for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float step = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;  // hi: x / step
      d[m * nb + b] = step / R;
      int8_t* hi = xq + (m * nb + b) * 2 * QK;
      int8_t* lo = hi + QK;
      for (int64_t i = 0; i < QK; ++i) {
        const int64_t j = deinterleave ? (i % 2) * (QK / 2) + i / 2 : i;
        const float h = std::nearbyint(xb[i] * inv);
        hi[j] = static_cast<int8_t>(h);
        lo[j] = static_cast<int8_t>(std::clamp(std::nearbyint((xb[i] - h * step) * inv * R), -127.f, 127.f));
      }
    }
  }
}

// One block b of a weight row against T activation rows (xq rows 2K apart).
template <int T>
inline void q8_block(const int8_t* w, const int8_t* xq, const float* d, int64_t K, int64_t nb, int64_t b,
                     __m256 (&acc)[T]) {
  _mm_prefetch(reinterpret_cast<const char*>(w + b * QK) + PREFETCH, _MM_HINT_T0);
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * QK));
  const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w|
  for (int t = 0; t < T; ++t) {
    const int8_t* xb = xq + t * 2 * K + b * 2 * QK;
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + QK));
    // x * sign(w): |w| . (x * sign(w)) == w . x
    const __m256 dot = dot2_u8s8(aw, _mm256_sign_epi8(hi, wv), _mm256_sign_epi8(lo, wv));
    acc[t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d[t * nb + b]), acc[t]);
  }
}

// One weight row against T activation rows (T <= TILE, unrolled): out[t * ldo] = w . x_t. U accumulators per row,
// for U consecutive blocks, so that their FMAs do not wait on each other (at T = 1 the FMA latency bounds the loop).
template <int T, int U = (T == 1 ? 4 : 2)>
inline void q8_tile(const int8_t* w, const int8_t* xq, const float* d, int64_t K, int64_t nb, float s, float* out,
                    int64_t ldo) {
  __m256 acc[U][T];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + U <= nb; b += U)
    for (int u = 0; u < U; ++u) q8_block<T>(w, xq, d, K, nb, b + u, acc[u]);
  for (; b < nb; ++b) q8_block<T>(w, xq, d, K, nb, b, acc[0]);
  for (int t = 0; t < T; ++t) {
    __m256 sum = acc[0][t];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][t]);
    out[t * ldo] = hsum(sum) * s;
  }
}

template <int T>
inline void q4_block(const uint8_t* w, const at::BFloat16* sn, int shift, const int8_t* xq, const float* d,
                     int64_t K, int64_t nb, int64_t b, __m256 (&acc)[T]) {
  const __m128i low = _mm_set1_epi8(0x0F);
  if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + b * (QK / 2)) + PREFETCH, _MM_HINT_T0);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * (QK / 2)));
  const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low),
                                         _mm_and_si128(bytes, low));  // (evens | odds) in 0..15
  const float s = static_cast<float>(sn[b >> shift]);  // group b / (blocks per group)
  for (int t = 0; t < T; ++t) {
    const int8_t* xb = xq + t * 2 * K + b * 2 * QK;
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + QK));
    acc[t] = _mm256_fmadd_ps(dot2_u8s8(codes, hi, lo), _mm256_set1_ps(d[t * nb + b] * s), acc[t]);
  }
}

// int4: sum_g s_g sum_{b in g} d_b (codes_b . xq_b) + sum_g (z_g - 8 s_g) * (sum of x over g)
template <int T, int U = (T == 1 ? 4 : 2)>
inline void q4_tile(const uint8_t* w, const at::BFloat16* sn, const at::BFloat16* zn, const int8_t* xq,
                    const float* d, const float* xsum, int64_t K, int64_t nb, int64_t ng, int64_t group, float* out,
                    int64_t ldo) {
  const int shift = __builtin_ctzll(group / QK);  // log2 of the blocks per group (a power of two)
  __m256 acc[U][T];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + U <= nb; b += U)
    for (int u = 0; u < U; ++u) q4_block<T>(w, sn, shift, xq, d, K, nb, b + u, acc[u]);
  for (; b < nb; ++b) q4_block<T>(w, sn, shift, xq, d, K, nb, b, acc[0]);
  for (int t = 0; t < T; ++t) {
    __m256 offv = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {  // (z - 8 s) . xsum, 8 groups at a time
      const __m256 zs = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), bf16x8(sn + g), bf16x8(zn + g));
      offv = _mm256_fmadd_ps(zs, _mm256_loadu_ps(xsum + t * ng + g), offv);
    }
    float off = hsum(offv);
    for (; g < ng; ++g) off += (static_cast<float>(zn[g]) - 8.f * static_cast<float>(sn[g])) * xsum[t * ng + g];
    __m256 sum = acc[0][t];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][t]);
    out[t * ldo] = hsum(sum) + off;
  }
}

// tile(T, n, m0) for every output row n (rows split over torch's threads) and every tile of T <= TILE activation
// rows from m0, T a compile-time constant (std::integral_constant) so that each tile kernel is unrolled
template <class Tile>
void for_row_tiles(int64_t N, int64_t M, Tile&& tile) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += TILE) switch (std::min(TILE, M - m0)) {
          case 1: tile(std::integral_constant<int, 1>{}, n, m0); break;
          case 2: tile(std::integral_constant<int, 2>{}, n, m0); break;
          case 3: tile(std::integral_constant<int, 3>{}, n, m0); break;
          default: tile(std::integral_constant<int, 4>{}, n, m0);
        }
  });
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(K % QK == 0, "the input dim must be a multiple of 32, got ", K);
}

}  // namespace

at::Tensor q8_linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8 (N, K)");
  const int64_t N = q.size(0), K = q.size(1), nb = K / QK;
  check_x(x_in, K);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.numel() == N && scale.is_contiguous(), "scale (N,) bf16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  std::vector<int8_t> xq(M * 2 * K);
  std::vector<float> d(M * nb);
  quantize_activations(x.data_ptr<float>(), M, K, xq.data(), d.data(), false);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::BFloat16* sp = scale.data_ptr<at::BFloat16>();
  for_row_tiles(N, M, [&](auto T, int64_t n, int64_t m0) {
    q8_tile<decltype(T)::value>(qp + n * K, xq.data() + m0 * 2 * K, d.data() + m0 * nb, K, nb,
                                static_cast<float>(sp[n]), yp + m0 * N + n, N);
  });
  return y;
}

at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q must be contiguous uint8 (N, K/2)");
  const int64_t N = q.size(0), K = 2 * q.size(1), nb = K / QK;
  check_x(x_in, K);
  TORCH_CHECK(group >= QK && (group & (group - 1)) == 0, "the group size must be a power of two >= 32, got ", group);
  const int64_t ng = (K + group - 1) / group;
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->size(0) == N && t->size(1) == ng &&
                    t->is_contiguous(), "scale and zero must be contiguous bf16 (N, ", ng, ")");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  std::vector<int8_t> xq(M * 2 * K);
  std::vector<float> d(M * nb), xsum(M * ng, 0.f);  // xsum: each group's sum of the (unquantized) activations
  quantize_activations(x.data_ptr<float>(), M, K, xq.data(), d.data(), true);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * ng + k / group] += xp[m * K + k];
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::BFloat16* sp = scale.data_ptr<at::BFloat16>();
  const at::BFloat16* zp = zero.data_ptr<at::BFloat16>();
  for_row_tiles(N, M, [&](auto T, int64_t n, int64_t m0) {
    q4_tile<decltype(T)::value>(qp + n * (K / 2), sp + n * ng, zp + n * ng, xq.data() + m0 * 2 * K, d.data() + m0 * nb,
                                xsum.data() + m0 * ng, K, nb, ng, group, yp + m0 * N + n, N);
  });
  return y;
}

// One fp32 weight row against T activation rows (T <= TILE, unrolled), U accumulators per row
template <int T, int U = (T == 1 ? 4 : 2)>
inline void f32_tile(const float* w, const float* x, int64_t K, float* out, int64_t ldo) {
  __m256 acc[U][T];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; u += 2)  // every 64-byte line of the row ahead
      _mm_prefetch(reinterpret_cast<const char*>(w + k + 8 * u) + PREFETCH, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_loadu_ps(w + k + 8 * u);
      for (int t = 0; t < T; ++t) acc[u][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k + 8 * u), acc[u][t]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int t = 0; t < T; ++t) acc[0][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k), acc[0][t]);
  }
  for (int t = 0; t < T; ++t) {
    __m256 sum = acc[0][t];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][t]);
    float y = hsum(sum);
    for (int64_t j = k; j < K; ++j) y += w[j] * x[t * K + j];
    out[t * ldo] = y;
  }
}

// x (M, K) fp32 @ W^T, W (N, K) fp32 row-major (contiguous rows) -> (M, N): dot products per row, rows over threads
at::Tensor f32_rows(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.stride(1) == 1, "w must be fp32 (N, K), rows "
              "contiguous");
  const int64_t N = w.size(0), K = w.size(1), ldw = w.stride(0);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "x must be (M, ", K, "), got ", x_in.sizes());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  for_row_tiles(N, M, [&](auto T, int64_t n, int64_t m0) {
    f32_tile<decltype(T)::value>(wp + n * ldw, xp + m0 * K, K, yp + m0 * N + n, N);
  });
  return y;
}

// x (M, K) fp32 @ wt (K, N) fp32 (any strides: a transposed row-major weight or a column-major one) -> (M, N),
// each thread running torch's matmul on its own slice of the N columns
at::Tensor f32_linear(const at::Tensor& x_in, const at::Tensor& wt_in) {
  TORCH_CHECK(x_in.dim() == 2 && wt_in.dim() == 2 && x_in.size(1) == wt_in.size(0), "x (M, K) and wt (K, N) expected");
  // detached: the worker threads do not share the caller's grad mode, and nothing here is differentiated
  const at::Tensor x = x_in.detach(), wt = wt_in.detach();
  const int64_t M = x.size(0), N = wt.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t chunks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t step = ((N + chunks - 1) / chunks + 63) / 64 * 64;  // whole cache lines per slice
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    c10::InferenceMode guard;  // the workers lack the caller's mode: y may be an inference tensor
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s = c * step, e = std::min(N, s + step);
      if (s >= e) continue;
      at::Tensor out = y.narrow(1, s, e - s);
      at::mm_out(out, x, wt.narrow(1, s, e - s));
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_linear", &q8_linear, "x (M, K) @ (q * scale)^T, int8 q (N, K)");
  m.def("q4_linear", &q4_linear, "x (M, K) @ ((q - 8) * scale + zero)^T, int4 file layout");
  m.def("f32_rows", &f32_rows, "x (M, K) @ W^T, fp32 W (N, K) with contiguous rows");
  m.def("f32_linear", &f32_linear, "x (M, K) @ wt (K, N), output columns split over threads");
}
