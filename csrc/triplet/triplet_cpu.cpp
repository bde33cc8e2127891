// CPU chunk passes of the weighted triplet loss (see triplet.h), parallel with at::parallel_for:
// the rows pass over rows, the cols pass over blocks of columns, the sparse scatter over output rows.
// Each output is reduced by one thread in a fixed order, so results do not depend on scheduling.
// Sums are accumulated in double (the values are then stored in the accumulation dtype).
#include <ATen/Parallel.h>

#include <algorithm>

#include "triplet/focal.h"
#include "triplet/triplet.h"

namespace rspeft {
namespace triplet {
namespace {

constexpr int64_t kColBlock = 256;  // columns per cols-pass task (contiguous inner loop)

// Sets a column poison flag that several row tasks may set at once (always to the same value).
inline void set_flag(int32_t* f) {
#if defined(__GNUC__) || defined(__clang__)
  __atomic_store_n(f, 1, __ATOMIC_RELAXED);
#else
  *reinterpret_cast<volatile int32_t*>(f) = 1;
#endif
}

template <typename acc_t>
void rows_impl(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_a, const at::Tensor& a_ids,
               const at::Tensor& o_ids, const PassArgs& p, at::Tensor& row_val, at::Tensor& row_gsum,
               at::Tensor& row_arg, at::Tensor& row_coef, const at::Tensor& d_o, Poison* poison) {
  const int64_t R = S.size(0), N = S.size(1);
  const acc_t* s = S.data_ptr<acc_t>();
  const acc_t* da = d_a.data_ptr<acc_t>();
  const int64_t* aid = a_ids.data_ptr<int64_t>();
  const int64_t* oid = o_ids.data_ptr<int64_t>();
  const acc_t m = static_cast<acc_t>(p.margin), gamma = static_cast<acc_t>(p.gamma);
  const bool write_g = p.need_grad && !p.max_violation;
  acc_t* g = write_g ? G.data_ptr<acc_t>() : nullptr;
  acc_t* rv = row_val.data_ptr<acc_t>();
  if (!p.max_violation) {
    acc_t* rg = row_gsum.data_ptr<acc_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* sr = s + r * N;
        acc_t* gr = write_g ? g + r * N : nullptr;
        const acc_t dr = da[r];
        const int64_t ar = aid[r];
        double v = 0, gs = 0;
        for (int64_t j = 0; j < N; ++j) {
          acc_t df;
          const acc_t f = focal<acc_t>((m + sr[j]) - dr, oid[j] == ar, gamma, &df);
          v += f;
          gs += df;
          if (gr) gr[j] = df;
        }
        rv[r] = static_cast<acc_t>(v);
        rg[r] = static_cast<acc_t>(gs);
      }
    });
    return;
  }
  int64_t* ra = row_arg.data_ptr<int64_t>();
  acc_t* rk = row_coef.data_ptr<acc_t>();
  // poison flags (see triplet.h): row flags are this task's own; column flags are shared (set_flag)
  int32_t* p_row_own = poison ? poison->row_own.data_ptr<int32_t>() : nullptr;
  int32_t* p_row_any = poison ? poison->row_any.data_ptr<int32_t>() : nullptr;
  int32_t* p_col_any = poison ? poison->col_any.data_ptr<int32_t>() : nullptr;
  const bool with_cols = poison && poison->col_own.defined();
  int32_t* p_col_own = with_cols ? poison->col_own.data_ptr<int32_t>() : nullptr;
  const acc_t* dd = with_cols ? d_o.data_ptr<acc_t>() : nullptr;
  const acc_t inf = pos_inf<acc_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* sr = s + r * N;
      const acc_t dr = da[r];
      const int64_t ar = aid[r];
      acc_t best = acc_t(-1), best_df = acc_t(0);
      int64_t arg = 0;
      for (int64_t j = 0; j < N; ++j) {  // ascending j, strict '>' (or first NaN): lowest index wins ties
        acc_t df;
        const bool masked = oid[j] == ar;
        const acc_t c = (m + sr[j]) - dr;
        const acc_t f = focal<acc_t>(c, masked, gamma, &df);
        if (max_takes(f, best)) {
          best = f;
          best_df = df;
          arg = j;
        }
        if (p_row_any && !masked) {
          const bool own = c == inf;
          const bool other = dd != nullptr && (m + sr[j]) - dd[j] == inf;
          if (own || other) {
            if (own) p_row_own[r] = 1;
            p_row_any[r] = 1;
            if (other) set_flag(p_col_own + j);
            set_flag(p_col_any + j);
          }
        }
      }
      rv[r] = best;
      ra[r] = arg;
      rk[r] = best_df;
    }
  });
}

template <typename acc_t>
void cols_impl(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_o, const at::Tensor& a_ids,
               const at::Tensor& o_ids, int64_t row_offset, const PassArgs& p, at::Tensor& col_val,
               at::Tensor& col_gsum, at::Tensor& col_arg, at::Tensor& col_coef) {
  const int64_t R = S.size(0), N = S.size(1);
  const acc_t* s = S.data_ptr<acc_t>();
  const acc_t* dd = d_o.data_ptr<acc_t>();
  const int64_t* aid = a_ids.data_ptr<int64_t>();
  const int64_t* oid = o_ids.data_ptr<int64_t>();
  const acc_t m = static_cast<acc_t>(p.margin), gamma = static_cast<acc_t>(p.gamma);
  const bool write_g = p.need_grad && !p.max_violation;
  acc_t* g = write_g ? G.data_ptr<acc_t>() : nullptr;
  acc_t* cv = col_val.data_ptr<acc_t>();
  const int64_t nblk = (N + kColBlock - 1) / kColBlock;
  if (!p.max_violation) {
    acc_t* cg = col_gsum.data_ptr<acc_t>();
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      double v[kColBlock], gs[kColBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = b * kColBlock, j1 = std::min(N, j0 + kColBlock), w = j1 - j0;
        std::fill(v, v + w, 0.0);
        std::fill(gs, gs + w, 0.0);
        for (int64_t r = 0; r < R; ++r) {  // rows in increasing order
          const acc_t* sr = s + r * N;
          acc_t* gr = write_g ? g + r * N : nullptr;
          const int64_t ar = aid[r];
          for (int64_t j = j0; j < j1; ++j) {
            acc_t df;
            const acc_t f = focal<acc_t>((m + sr[j]) - dd[j], oid[j] == ar, gamma, &df);
            v[j - j0] += f;
            gs[j - j0] += df;
            if (gr) gr[j] += df;
          }
        }
        for (int64_t j = j0; j < j1; ++j) {
          cv[j] = static_cast<acc_t>(cv[j] + v[j - j0]);
          cg[j] = static_cast<acc_t>(cg[j] + gs[j - j0]);
        }
      }
    });
    return;
  }
  int64_t* ca = col_arg.data_ptr<int64_t>();
  acc_t* ck = col_coef.data_ptr<acc_t>();
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kColBlock, j1 = std::min(N, j0 + kColBlock);
      for (int64_t r = 0; r < R; ++r) {  // increasing rows, strict '>' (or first NaN): lowest row wins ties
        const acc_t* sr = s + r * N;
        const int64_t ar = aid[r];
        for (int64_t j = j0; j < j1; ++j) {
          acc_t df;
          const acc_t f = focal<acc_t>((m + sr[j]) - dd[j], oid[j] == ar, gamma, &df);
          if (max_takes(f, cv[j])) {
            cv[j] = f;
            ca[j] = row_offset + r;
            ck[j] = df;
          }
        }
      }
    }
  });
}

template <typename acc_t>
void scatter_impl(at::Tensor& out, const at::Tensor& keys, const at::Tensor& perm, const at::Tensor& coef,
                  const at::Tensor& src) {
  const int64_t M = out.size(0), D = out.size(1), K = keys.size(0);
  acc_t* o = out.data_ptr<acc_t>();
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t* pm = perm.data_ptr<int64_t>();
  const acc_t* c = coef.data_ptr<acc_t>();
  const acc_t* x = src.data_ptr<acc_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* lo = std::lower_bound(k, k + K, row);
      const int64_t* hi = std::upper_bound(lo, k + K, row);
      acc_t* orow = o + row * D;
      for (const int64_t* t = lo; t < hi; ++t) {  // sorted, stable: increasing source index
        const int64_t i = pm[t - k];
        const acc_t ci = c[i];
        const acc_t* xi = x + i * D;
        for (int64_t e = 0; e < D; ++e) orow[e] += ci * xi[e];
      }
    }
  });
}

void check_pass(const at::Tensor& S, const at::Tensor& G) {
  TORCH_CHECK(S.device().is_cpu() && S.is_contiguous(), "triplet rows/cols pass: S must be contiguous on CPU");
  TORCH_CHECK(G.numel() == 0 || (G.sizes() == S.sizes() && G.is_contiguous()), "triplet pass: bad G buffer");
}

}  // namespace

void rows_pass_cpu(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_a, const at::Tensor& a_ids,
                   const at::Tensor& o_ids, const PassArgs& p, at::Tensor& row_val, at::Tensor& row_gsum,
                   at::Tensor& row_arg, at::Tensor& row_coef, const at::Tensor& d_o, Poison* poison) {
  check_pass(S, G);
  const at::Tensor dd = poison && poison->col_own.defined() ? d_o.contiguous() : d_o;
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "triplet_rows_pass_cpu", [&] {
    rows_impl<scalar_t>(S, G, d_a.contiguous(), a_ids.contiguous(), o_ids.contiguous(), p, row_val, row_gsum,
                        row_arg, row_coef, dd, poison);
  });
}

void cols_pass_cpu(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_o, const at::Tensor& a_ids,
                   const at::Tensor& o_ids, int64_t row_offset, const PassArgs& p, at::Tensor& col_val,
                   at::Tensor& col_gsum, at::Tensor& col_arg, at::Tensor& col_coef) {
  check_pass(S, G);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "triplet_cols_pass_cpu", [&] {
    cols_impl<scalar_t>(S, G, d_o.contiguous(), a_ids.contiguous(), o_ids.contiguous(), row_offset, p, col_val,
                        col_gsum, col_arg, col_coef);
  });
}

void scatter_sorted_cpu(at::Tensor& out, const at::Tensor& keys, const at::Tensor& perm, const at::Tensor& coef,
                        const at::Tensor& src) {
  TORCH_CHECK(out.is_contiguous() && src.is_contiguous() && coef.is_contiguous(), "triplet scatter: contiguous");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "triplet_scatter_sorted_cpu", [&] {
    scatter_impl<scalar_t>(out, keys, perm, coef, src);
  });
}

}  // namespace triplet
}  // namespace rspeft
