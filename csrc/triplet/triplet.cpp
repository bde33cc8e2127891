// Device-generic driver of the weighted triplet loss (see triplet.h for the chunk passes).
//
// Loss (SPEC §1) for the local rows I = [row_start, row_start + row_count) of an (N, D) batch:
//   band "img": anchors img[I], others txt (all N), d_a = d[I]         → Cs rows    (caption retrieval)
//   band "txt": anchors txt[I], others img (all N), d_a = d[I]         → Ci columns (image retrieval)
//   loss = (Σ band img + Σ band txt) / 2,   d[i] = <img_i, txt_i>
// (the band "txt" is the column band S[:, I] read transposed: Ci[i, j] = margin + <txt_j, img_i> - d[j]).
// When I is the whole batch, one band carries both: anchors img, others txt, rows use d[i], columns d[j];
// each S tile is then computed once for Cs and Ci.
// Gradients (need_grad) are produced here too, chunk by chunk: dS = G/2 with G = f'(cr) + f'(cc) (sum
// mode) gives grad_anchor[I_chunk] = G·O/2 and grad_other += Gᵀ·A[I_chunk]/2; the diagonal adds
// -Σ f' to d. Hard mining builds them sparsely from (arg, coef) only. Nothing B×B is kept.
#include "triplet/triplet.h"

#include <ATen/ATen.h>

#include <limits>

namespace rspeft {
namespace triplet {
namespace {

// Default chunk: rows = max(kMinRows, elems / N) (capped by the band): a buffer of at most max(4 MiB,
// kMinRows·N) fp32 on CPU (64 MiB, kMinRows·N on CUDA), i.e. O(B) memory, never B×B for large B; the
// row floor keeps the GEMMs large enough to run near their peak (small-M GEMMs are slow on CPU).
constexpr int64_t kDefaultChunkCpu = int64_t(1) << 20;
constexpr int64_t kDefaultChunkCuda = int64_t(1) << 24;
constexpr int64_t kMinRows = 256;

bool on_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

void rows_pass(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_a, const at::Tensor& a_ids,
               const at::Tensor& o_ids, const PassArgs& p, at::Tensor& v, at::Tensor& gs, at::Tensor& arg,
               at::Tensor& coef, const at::Tensor& d_o, Poison* poison) {
  if (on_cuda(S)) {
#ifdef RSPEFT_WITH_CUDA
    rows_pass_cuda(S, G, d_a, a_ids, o_ids, p, v, gs, arg, coef, d_o, poison);
    return;
#else
    TORCH_CHECK(false, "rspeft_fast._C was built without CUDA kernels (RSPEFT_FAST_CPU_ONLY or no nvcc)");
#endif
  }
  rows_pass_cpu(S, G, d_a, a_ids, o_ids, p, v, gs, arg, coef, d_o, poison);
}

void cols_pass(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_o, const at::Tensor& a_ids,
               const at::Tensor& o_ids, int64_t row_offset, const PassArgs& p, at::Tensor& v, at::Tensor& gs,
               at::Tensor& arg, at::Tensor& coef) {
  if (on_cuda(S)) {
#ifdef RSPEFT_WITH_CUDA
    cols_pass_cuda(S, G, d_o, a_ids, o_ids, row_offset, p, v, gs, arg, coef);
    return;
#else
    TORCH_CHECK(false, "rspeft_fast._C was built without CUDA kernels (RSPEFT_FAST_CPU_ONLY or no nvcc)");
#endif
  }
  cols_pass_cpu(S, G, d_o, a_ids, o_ids, row_offset, p, v, gs, arg, coef);
}

// out[k] += Σ_{t: idx[t] == k} coef[t] · src[t], deterministic (stable sort, fixed-order segment sums).
void scatter_rows(at::Tensor& out, const at::Tensor& idx, const at::Tensor& coef, const at::Tensor& src) {
  auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor keys = std::get<0>(sorted).contiguous();
  at::Tensor perm = std::get<1>(sorted).contiguous();
  if (on_cuda(out)) {
#ifdef RSPEFT_WITH_CUDA
    scatter_sorted_cuda(out, keys, perm, coef, src);
    return;
#else
    TORCH_CHECK(false, "rspeft_fast._C was built without CUDA kernels (RSPEFT_FAST_CPU_ONLY or no nvcc)");
#endif
  }
  scatter_sorted_cpu(out, keys, perm, coef, src);
}

struct BandResult {
  at::Tensor loss;   // 0-dim: Σ of the band's row terms (+ column terms)
  at::Tensor gA;     // (R, D) gradient wrt the anchors, unscaled (without the 1/2)
  at::Tensor gO;     // (N, D) gradient wrt the others
  at::Tensor g_da;   // (R)   gradient wrt d_a
  at::Tensor g_do;   // (N)   gradient wrt d_o (column terms only)
};

// One band: anchors A (R, D), others O (N, D), both contiguous in the accumulation dtype.
BandResult run_band(const at::Tensor& A, const at::Tensor& O, const at::Tensor& d_a, const at::Tensor& d_o,
                    const at::Tensor& a_ids, const at::Tensor& o_ids, bool col_terms, const PassArgs& p,
                    int64_t chunk_elems) {
  const int64_t R = A.size(0), N = O.size(0), D = A.size(1);
  const auto fopt = A.options();
  const auto iopt = A.options().dtype(at::kLong);
  const bool by_default = chunk_elems <= 0;
  if (by_default) chunk_elems = on_cuda(A) ? kDefaultChunkCuda : kDefaultChunkCpu;
  int64_t rows = chunk_elems / std::max<int64_t>(N, 1);
  if (by_default) rows = std::max(rows, kMinRows);  // an explicit chunk_elems is taken as given (tests)
  rows = std::max<int64_t>(1, std::min<int64_t>(R, rows));
  const bool sum_grad = p.need_grad && !p.max_violation;

  at::Tensor Sbuf = at::empty({rows, N}, fopt);
  at::Tensor Gbuf = sum_grad ? at::empty({rows, N}, fopt) : at::empty({0, N}, fopt);
  at::Tensor row_val = at::empty({R}, fopt);
  at::Tensor row_gsum = p.max_violation ? at::empty({0}, fopt) : at::empty({R}, fopt);
  at::Tensor row_arg = p.max_violation ? at::empty({R}, iopt) : at::empty({0}, iopt);
  at::Tensor row_coef = p.max_violation ? at::empty({R}, fopt) : at::empty({0}, fopt);
  at::Tensor col_val, col_gsum, col_arg, col_coef;
  if (col_terms) {
    // max mode: every value is >= 0 or NaN, so -1 is below all of them and the first row always replaces it
    col_val = p.max_violation ? at::full({N}, -1.0, fopt) : at::zeros({N}, fopt);
    col_gsum = p.max_violation ? at::empty({0}, fopt) : at::zeros({N}, fopt);
    col_arg = p.max_violation ? at::zeros({N}, iopt) : at::empty({0}, iopt);
    col_coef = p.max_violation ? at::zeros({N}, fopt) : at::empty({0}, fopt);
  }
  // hard mining with gradients: flags of the unmasked +inf costs (see triplet.h); all zero for finite inputs
  const bool poisoned = p.max_violation && p.need_grad && p.gamma > 0;
  Poison flags;
  if (poisoned) {
    const auto i32 = A.options().dtype(at::kInt);
    flags.row_own = at::zeros({R}, i32);
    flags.row_any = at::zeros({R}, i32);
    flags.col_any = at::zeros({N}, i32);
    if (col_terms) flags.col_own = at::zeros({N}, i32);
  }
  BandResult res;
  if (sum_grad) {
    res.gA = at::empty({R, D}, fopt);
    res.gO = at::zeros({N, D}, fopt);
  }
  const at::Tensor Ot = O.t();
  for (int64_t r0 = 0; r0 < R; r0 += rows) {
    const int64_t rc = std::min(rows, R - r0);
    at::Tensor S = Sbuf.narrow(0, 0, rc);
    at::Tensor G = sum_grad ? Gbuf.narrow(0, 0, rc) : Gbuf;
    const at::Tensor Ac = A.narrow(0, r0, rc);
    at::mm_out(S, Ac, Ot);
    const at::Tensor a_ids_c = a_ids.narrow(0, r0, rc);
    at::Tensor rv = row_val.narrow(0, r0, rc);
    at::Tensor rg = p.max_violation ? row_gsum : row_gsum.narrow(0, r0, rc);
    at::Tensor ra = p.max_violation ? row_arg.narrow(0, r0, rc) : row_arg;
    at::Tensor rk = p.max_violation ? row_coef.narrow(0, r0, rc) : row_coef;
    Poison chunk_flags;
    if (poisoned) {
      chunk_flags = flags;
      chunk_flags.row_own = flags.row_own.narrow(0, r0, rc);
      chunk_flags.row_any = flags.row_any.narrow(0, r0, rc);
    }
    rows_pass(S, G, d_a.narrow(0, r0, rc), a_ids_c, o_ids, p, rv, rg, ra, rk, d_o, poisoned ? &chunk_flags : nullptr);
    if (col_terms) {
      cols_pass(S, G, d_o, a_ids_c, o_ids, r0, p, col_val, col_gsum, col_arg, col_coef);
    }
    if (sum_grad) {
      at::Tensor gA_c = res.gA.narrow(0, r0, rc);
      at::mm_out(gA_c, G, O);
      res.gO.addmm_(G.t(), Ac);  // chunks in increasing order: a fixed accumulation order
    }
  }
  res.loss = row_val.sum();
  if (col_terms) res.loss = res.loss + col_val.sum();
  if (!p.need_grad) return res;
  if (!p.max_violation) {
    res.g_da = row_gsum.neg();
    if (col_terms) res.g_do = col_gsum.neg();
    return res;
  }
  // Hard mining: only the arg-max entries carry gradient (and the diagonal through d).
  //   row r, argmax j = row_arg[r]:  ∂/∂A_r += coef_r·O_j,  ∂/∂O_j += coef_r·A_r,  ∂/∂d_a[r] -= coef_r
  //   col j, argmax r = col_arg[j]:  ∂/∂A_r += coef_j·O_j,  ∂/∂O_j += coef_j·A_r,  ∂/∂d_o[j] -= coef_j
  res.gA = row_coef.unsqueeze(1) * O.index_select(0, row_arg);
  res.gO = at::zeros({N, D}, fopt);
  scatter_rows(res.gO, row_arg, row_coef, A);
  res.g_da = row_coef.neg();
  if (col_terms) {
    res.gO.addcmul_(col_coef.unsqueeze(1), A.index_select(0, col_arg));
    scatter_rows(res.gA, col_arg, col_coef, O);
    res.g_do = col_coef.neg();
  }
  // What eager's dense dS·O and dSᵀ·A add for non-finite inputs (see triplet.h); no-ops for finite ones:
  // (a) a NaN/inf feature makes its column of the other side's gradient NaN (Σ_j 0·x_j is NaN exactly then);
  res.gA.add_(O.mul(0).sum(0, /*keepdim=*/true));
  res.gO.add_(A.mul(0).sum(0, /*keepdim=*/true));
  // (b) the rows and columns of dS holding an unmasked +inf cost are NaN, and so is d's gradient there.
  if (poisoned) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    res.gA.masked_fill_(flags.row_any.ne(0).unsqueeze(1), nan);
    res.gO.masked_fill_(flags.col_any.ne(0).unsqueeze(1), nan);
    res.g_da.masked_fill_(flags.row_own.ne(0), nan);
    if (col_terms) res.g_do.masked_fill_(flags.col_own.ne(0), nan);
  }
  return res;
}

void check_inputs(const at::Tensor& img, const at::Tensor& txt, const c10::optional<at::Tensor>& ids,
                  int64_t row_start, int64_t row_count) {
  TORCH_CHECK(img.dim() == 2 && txt.dim() == 2, "weighted_triplet: img and txt must be 2-D (B, D), got ",
              img.sizes(), " and ", txt.sizes());
  TORCH_CHECK(img.sizes() == txt.sizes(), "weighted_triplet: img and txt must have the same shape, got ",
              img.sizes(), " and ", txt.sizes());
  TORCH_CHECK(img.device() == txt.device(), "weighted_triplet: img on ", img.device(), " but txt on ",
              txt.device());
  for (const auto* t : {&img, &txt}) {
    const auto st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "weighted_triplet: features must be float32/float64/float16/bfloat16, got ", st);
  }
  const int64_t N = img.size(0);
  TORCH_CHECK(N >= 1, "weighted_triplet: empty batch");
  TORCH_CHECK(row_start >= 0 && row_count >= 1 && row_start + row_count <= N,
              "weighted_triplet: local rows [", row_start, ", ", row_start + row_count, ") outside [0, ", N, ")");
  if (ids.has_value() && ids->defined()) {
    TORCH_CHECK(ids->dim() == 1 && ids->size(0) == N, "weighted_triplet: ids must have shape (", N, "), got ",
                ids->sizes());
    TORCH_CHECK(ids->scalar_type() == at::kLong, "weighted_triplet: ids must be int64, got ", ids->scalar_type());
    TORCH_CHECK(ids->device() == img.device(), "weighted_triplet: ids on ", ids->device(), " but features on ",
                img.device());
  }
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt, const c10::optional<at::Tensor>& ids,
                                int64_t row_start, int64_t row_count, double margin, double gamma,
                                bool max_violation, bool need_grad, int64_t chunk_elems) {
  check_inputs(img, txt, ids, row_start, row_count);
  TORCH_CHECK(gamma >= 0, "weighted_triplet: gamma must be >= 0, got ", gamma);
  const bool dbl = img.scalar_type() == at::kDouble || txt.scalar_type() == at::kDouble;
  const auto acc = dbl ? at::kDouble : at::kFloat;
  const int64_t N = img.size(0);
  const bool whole = row_start == 0 && row_count == N;
  // fp32 (fp64) copies: bf16/fp16 products are exact in fp32, so this is the reference's upcast.
  const at::Tensor X = img.to(acc).contiguous();
  const at::Tensor Y = txt.to(acc).contiguous();
  const at::Tensor Xl = X.narrow(0, row_start, row_count);
  const at::Tensor Yl = Y.narrow(0, row_start, row_count);
  const at::Tensor d = (Xl * Yl).sum(1);  // d[i] = <img_i, txt_i> for the local rows
  const auto iopt = X.options().dtype(at::kLong);
  at::Tensor o_ids, a_ids;
  if (ids.has_value() && ids->defined()) {
    o_ids = ids->contiguous();
  } else {
    o_ids = at::arange(N, iopt);  // no ids: only the pair (i, i) is positive
  }
  a_ids = o_ids.narrow(0, row_start, row_count).contiguous();
  PassArgs p;
  p.margin = margin;
  p.gamma = gamma;
  p.max_violation = max_violation;
  p.need_grad = need_grad;

  at::Tensor loss;
  at::Tensor g_img, g_txt;
  if (whole) {
    BandResult b = run_band(X, Y, d, d, a_ids, o_ids, /*col_terms=*/true, p, chunk_elems);
    loss = b.loss * 0.5;
    if (need_grad) {
      g_img = b.gA;
      g_txt = b.gO;
      at::Tensor g_d = b.g_da + b.g_do;
      g_img.addcmul_(g_d.unsqueeze(1), Y);
      g_txt.addcmul_(g_d.unsqueeze(1), X);
    }
  } else {
    BandResult bi = run_band(Xl, Y, d, d, a_ids, o_ids, /*col_terms=*/false, p, chunk_elems);
    BandResult bt = run_band(Yl, X, d, d, a_ids, o_ids, /*col_terms=*/false, p, chunk_elems);
    loss = (bi.loss + bt.loss) * 0.5;
    if (need_grad) {
      g_img = bt.gO;  // (N, D): images as the "others" of the text anchors
      g_txt = bi.gO;
      at::Tensor g_d = bi.g_da + bt.g_da;
      g_img.narrow(0, row_start, row_count).add_(bi.gA).addcmul_(g_d.unsqueeze(1), Yl);
      g_txt.narrow(0, row_start, row_count).add_(bt.gA).addcmul_(g_d.unsqueeze(1), Xl);
    }
  }
  if (need_grad) {
    g_img.mul_(0.5);  // exact: a power of two
    g_txt.mul_(0.5);
  } else {
    g_img = at::empty({0}, X.options());
    g_txt = at::empty({0}, X.options());
  }
  return {loss, g_img, g_txt};
}

}  // namespace triplet
}  // namespace rspeft
