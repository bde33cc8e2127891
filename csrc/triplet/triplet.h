// HarMA's weighted triplet loss with hard-negative mining (SPEC §1): the C++ driver and the
// per-device chunk kernels it calls.
//
// The driver (triplet.cpp, device-generic) walks a "band" of the similarity matrix in row chunks:
// S_chunk = A[r0:r1] · Oᵀ (at::mm: MKL on CPU, cuBLAS on CUDA) into a (rows × N) buffer, then two
// elementwise/reduction passes over the chunk run on the device:
//   * rows pass: per anchor row r, the "row" cost cr = (margin + s) - d_a[r]
//       sum mode: row_val[r] = Σ_j f(cr), row_gsum[r] = Σ_j f'(cr), G[r, j] = f'(cr)
//       max mode: row_val[r] = max_j f(cr), row_arg[r] = lowest j reaching it, row_coef[r] = f'(cr) there
//   * cols pass (only when the band carries column terms): cc = (margin + s) - d_o[j]
//       sum mode: col_val[j] += Σ_r f(cc), col_gsum[j] += Σ_r f'(cc), G[r, j] += f'(cc)
//       max mode: (col_val, col_arg, col_coef)[j] updated with the chunk's rows; the lowest row wins ties
// Masked (same id, or the positive pair when there are no ids) and clamped entries count as f = 0
// (they still take part in the max, where a value of 0 can be the maximum). NaN costs give f = NaN and
// win the max (the first NaN is the arg-max), as in the eager reference (see focal.h).
// Non-finite features, hard mining with gradients: eager builds a dense dS (zero but for the arg-max
// entries) and multiplies it by the features, so (a) a NaN/inf feature makes its whole column of the
// other gradient NaN (0·NaN, 0·inf), and (b) an unmasked +inf cost (gamma > 0) has a NaN gradient even
// off the arg-max (0·inf in the focal weight's backward), which makes its row and column of dS NaN.
// The sparse kernels reproduce (a) with a per-column term and (b) with the "poison" flags below, which
// the rows pass sets for every unmasked +inf cost (never touched for finite inputs).
// Every reduction runs in a fixed order, so results are bitwise reproducible for the same inputs
// (and the same device, thread count and chunk size).
#pragma once

#include <ATen/ATen.h>
#include <optional>

#include <vector>

namespace rspeft {
namespace triplet {

struct PassArgs {
  double margin = 0.2;
  double gamma = 2.0;
  bool max_violation = false;
  bool need_grad = false;
};

// Hard mining with gradients and gamma > 0 only (else the pass gets nullptr): int32 flags set to 1 by
// the rows pass for the unmasked +inf costs; the driver turns them into NaN gradient terms.
struct Poison {
  at::Tensor row_own;  // (R) chunk slice: a row term cr of the row is +inf          → NaN in d_a's grad
  at::Tensor row_any;  // (R) chunk slice: a row or column term of the row is +inf   → NaN anchor grad row
  at::Tensor col_own;  // (N): a column term cc of the column is +inf (with col terms) → NaN in d_o's grad
  at::Tensor col_any;  // (N): a row or column term of the column is +inf            → NaN other grad row
};

// rows pass over one chunk. S, G: (R, N) contiguous in the accumulation dtype (float or double);
// d_a, a_ids: (R); o_ids: (N). Outputs (length R slices): row_val, row_gsum (sum mode);
// row_val, row_arg (int64), row_coef (max mode). G is written only in sum mode with need_grad.
// poison (nullable, see Poison): d_o (N) is read only with poison and defined col_own (the column terms).
void rows_pass_cpu(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_a, const at::Tensor& a_ids,
                   const at::Tensor& o_ids, const PassArgs& p, at::Tensor& row_val, at::Tensor& row_gsum,
                   at::Tensor& row_arg, at::Tensor& row_coef, const at::Tensor& d_o, Poison* poison);
// cols pass over one chunk whose first row is band row `row_offset`; the (N)-long column state
// (col_val, col_gsum | col_val, col_arg, col_coef) accumulates across the chunks, which the driver
// visits in increasing row order.
void cols_pass_cpu(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_o, const at::Tensor& a_ids,
                   const at::Tensor& o_ids, int64_t row_offset, const PassArgs& p, at::Tensor& col_val,
                   at::Tensor& col_gsum, at::Tensor& col_arg, at::Tensor& col_coef);
// out[j] += Σ_{t : keys[t] == j} coef[perm[t]] · src[perm[t]] with keys sorted ascending (stable sort,
// so equal keys keep increasing perm): the sparse scatter of hard-mining gradients, in a fixed order.
void scatter_sorted_cpu(at::Tensor& out, const at::Tensor& keys, const at::Tensor& perm, const at::Tensor& coef,
                        const at::Tensor& src);

#ifdef RSPEFT_WITH_CUDA
void rows_pass_cuda(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_a, const at::Tensor& a_ids,
                    const at::Tensor& o_ids, const PassArgs& p, at::Tensor& row_val, at::Tensor& row_gsum,
                    at::Tensor& row_arg, at::Tensor& row_coef, const at::Tensor& d_o, Poison* poison);
void cols_pass_cuda(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_o, const at::Tensor& a_ids,
                    const at::Tensor& o_ids, int64_t row_offset, const PassArgs& p, at::Tensor& col_val,
                    at::Tensor& col_gsum, at::Tensor& col_arg, at::Tensor& col_coef);
void scatter_sorted_cuda(at::Tensor& out, const at::Tensor& keys, const at::Tensor& perm, const at::Tensor& coef,
                         const at::Tensor& src);
#endif

// The loss of the rows [row_start, row_start + row_count) of the images and the same columns of the texts
// (all of it when row_start == 0 and row_count == N), and, with need_grad, its gradients:
// returns {loss (0-dim), grad_img (N, D), grad_txt (N, D)} in the accumulation dtype (float64 for float64
// inputs, float32 otherwise); the gradients are empty tensors without need_grad.
// ids: (N) int64 or an undefined tensor. chunk_elems: rows per chunk = max(1, chunk_elems / N); 0 = the
// device default (see triplet.cpp: 2^20 elements on CPU, 2^24 on CUDA, at least 256 rows).
std::vector<at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt, const c10::optional<at::Tensor>& ids,
                                int64_t row_start, int64_t row_count, double margin, double gamma,
                                bool max_violation, bool need_grad, int64_t chunk_elems);

}  // namespace triplet
}  // namespace rspeft
