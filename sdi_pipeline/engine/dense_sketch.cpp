// The dense Linear-weight sketch fused in one pass (CPU), built once per host by
// sdi_pipeline/engine/native.py.
//
// For each example b it adds the CountSketch, under the induced hash
// (h_row(i) + h_col(j)) mod m with sign s_row(i) s_col(j), of the per-example gradient
// G = delta_b^T x_b (rows x cols) into out[b]: the same linear map as torch.bmm followed by
// index_add_, but G is formed 8 rows x 16 columns at a time in vector registers and scattered
// at once, so it never goes to memory. Each example is one thread's, in a fixed order: the
// result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));

constexpr int64_t kRows = 8;   // rows of G per register tile
constexpr int64_t kCols = 16;  // columns of G per register tile (one v16)

inline int32_t wrap(int32_t k, int32_t m) { return k >= m ? k - m : k; }

// A full tile: rows [0, kRows) of ds (rows x T) times columns [0, kCols) of xs (T x cols).
inline void full_tile(const float* __restrict ds, const float* __restrict xs, int64_t tokens,
                      int64_t cols, const int32_t* __restrict hr, const int32_t* __restrict hc,
                      int32_t m, float* __restrict out) {
  v16 acc[kRows];
  for (int64_t r = 0; r < kRows; ++r) acc[r] = v16{};
  for (int64_t t = 0; t < tokens; ++t) {
    v16 x;
    __builtin_memcpy(&x, xs + t * cols, sizeof(v16));
    for (int64_t r = 0; r < kRows; ++r) acc[r] += ds[r * tokens + t] * x;
  }
  for (int64_t r = 0; r < kRows; ++r) {
    float g[kCols];
    __builtin_memcpy(g, &acc[r], sizeof(v16));
    for (int64_t j = 0; j < kCols; ++j) out[wrap(hr[r] + hc[j], m)] += g[j];
  }
}

// The ragged edges: n_rows x n_cols entries one at a time.
inline void edge_tile(const float* ds, const float* xs, int64_t tokens, int64_t cols,
                      int64_t n_rows, int64_t n_cols, const int32_t* hr, const int32_t* hc,
                      int32_t m, float* out) {
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t j = 0; j < n_cols; ++j) {
      float g = 0.f;
      for (int64_t t = 0; t < tokens; ++t) g += ds[r * tokens + t] * xs[t * cols + j];
      out[wrap(hr[r] + hc[j], m)] += g;
    }
  }
}

std::vector<int32_t> checked_buckets(const at::Tensor& buckets, int64_t n, int64_t m,
                                     const char* what) {
  TORCH_CHECK(buckets.dtype() == at::kLong && buckets.is_contiguous() && buckets.numel() == n,
              what, " buckets must be ", n, " contiguous int64 values");
  const int64_t* data = buckets.data_ptr<int64_t>();
  std::vector<int32_t> out(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(data[i] >= 0 && data[i] < m, what, " bucket ", data[i], " is outside [0, ", m, ")");
    out[i] = static_cast<int32_t>(data[i]);
  }
  return out;
}

void dense_sketch_add(at::Tensor out, const at::Tensor& delta, const at::Tensor& x,
                      const at::Tensor& row_buckets, const at::Tensor& row_signs,
                      const at::Tensor& col_buckets, const at::Tensor& col_signs) {
  TORCH_CHECK(delta.dim() == 3 && x.dim() == 3 && out.dim() == 2, "expected (B, T, rows), "
              "(B, T, cols) and (B, m)");
  const int64_t batch = delta.size(0), tokens = delta.size(1);
  const int64_t rows = delta.size(2), cols = x.size(2), m = out.size(1);
  TORCH_CHECK(x.size(0) == batch && x.size(1) == tokens && out.size(0) == batch,
              "delta, x and out disagree on the batch or token count");
  for (const at::Tensor& t : {out, delta, x, row_signs, col_signs})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "float32 CPU tensors only");
  TORCH_CHECK(delta.is_contiguous() && x.is_contiguous() && out.stride(1) == 1,
              "delta and x must be contiguous and out's rows unit-stride");
  TORCH_CHECK(row_signs.is_contiguous() && row_signs.numel() == rows &&
                  col_signs.is_contiguous() && col_signs.numel() == cols,
              "one sign per row and per column");
  TORCH_CHECK(m > 0 && m < (int64_t{1} << 30), "m out of range");
  const std::vector<int32_t> hr = checked_buckets(row_buckets, rows, m, "row");
  const std::vector<int32_t> hc = checked_buckets(col_buckets, cols, m, "column");
  const float* sr = row_signs.data_ptr<float>();
  const float* sc = col_signs.data_ptr<float>();
  const float* d = delta.data_ptr<float>();
  const float* xx = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t out_stride = out.stride(0);
  const int32_t m32 = static_cast<int32_t>(m);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    // Signed factors of one example: ds row-major (rows x T), xs (T x cols).
    std::vector<float> ds(rows * tokens), xs(tokens * cols);
    const int64_t full_rows = rows / kRows * kRows, full_cols = cols / kCols * kCols;
    for (int64_t b = begin; b < end; ++b) {
      const float* db = d + b * tokens * rows;
      const float* xb = xx + b * tokens * cols;
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = 0; i < rows; ++i) ds[i * tokens + t] = db[t * rows + i] * sr[i];
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t j = 0; j < cols; ++j) xs[t * cols + j] = xb[t * cols + j] * sc[j];
      float* ob = o + b * out_stride;
      for (int64_t i = 0; i < full_rows; i += kRows) {
        const float* dsi = ds.data() + i * tokens;
        for (int64_t j = 0; j < full_cols; j += kCols)
          full_tile(dsi, xs.data() + j, tokens, cols, hr.data() + i, hc.data() + j, m32, ob);
        edge_tile(dsi, xs.data() + full_cols, tokens, cols, kRows, cols - full_cols,
                  hr.data() + i, hc.data() + full_cols, m32, ob);
      }
      edge_tile(ds.data() + full_rows * tokens, xs.data(), tokens, cols, rows - full_rows, cols,
                hr.data() + full_rows, hc.data(), m32, ob);
    }
  });
}

}  // namespace

TORCH_LIBRARY(sdi_pipeline, lib) {
  lib.def(
      "dense_sketch_add(Tensor(a!) out, Tensor delta, Tensor x, Tensor row_buckets, "
      "Tensor row_signs, Tensor col_buckets, Tensor col_signs) -> ()");
}

TORCH_LIBRARY_IMPL(sdi_pipeline, CPU, lib) { lib.impl("dense_sketch_add", dense_sketch_add); }
