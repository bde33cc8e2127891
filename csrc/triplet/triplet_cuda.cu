// CUDA chunk passes of the weighted triplet loss (see triplet.h). Same maths as triplet_cpu.cpp
// (focal.h is shared), same outputs; the parallel structure differs only in how reductions are split,
// and every reduction has a fixed order (no atomics), so the results are bitwise reproducible:
//   * rows pass: one block per chunk row; each thread walks j = tid, tid + 256, ... (ascending) and
//     the block combines the 256 partials with a fixed shared-memory tree. Max: (value, index) pairs,
//     the larger value wins and equal values keep the lower index, i.e. the lowest j of the row max;
//     NaN beats every number and the lowest-index NaN wins (focal.h: max_takes / max_beats).
//   * cols pass: thread per column j and row segment; each thread walks its segment's rows in
//     increasing order and writes a partial; a second kernel folds the partials in segment order into
//     the running column state (earlier chunks = lower rows; strict '>' keeps the lowest row on ties).
//   * scatter: one block per output row; the stable-sorted keys give the row's run of sources, summed
//     in increasing source order.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "triplet/focal.h"
#include "triplet/triplet.h"

namespace rspeft {
namespace triplet {
namespace {

constexpr int kThreads = 256;  // power of two (tree reductions below)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- rows pass
template <typename acc_t>
__global__ void rows_sum_kernel(const acc_t* __restrict__ S, acc_t* __restrict__ G, const acc_t* __restrict__ d_a,
                                const int64_t* __restrict__ a_ids, const int64_t* __restrict__ o_ids, int64_t N,
                                acc_t margin, acc_t gamma, bool write_g, acc_t* __restrict__ row_val,
                                acc_t* __restrict__ row_gsum) {
  __shared__ acc_t sh_v[kThreads];
  __shared__ acc_t sh_g[kThreads];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const acc_t* sr = S + r * N;
  acc_t* gr = G + r * N;  // only dereferenced when write_g
  const acc_t dr = d_a[r];
  const int64_t ar = a_ids[r];
  acc_t v = 0, gs = 0;
  for (int64_t j = tid; j < N; j += kThreads) {
    acc_t df;
    const acc_t f = focal<acc_t>((margin + sr[j]) - dr, o_ids[j] == ar, gamma, &df);
    v += f;
    gs += df;
    if (write_g) gr[j] = df;
  }
  sh_v[tid] = v;
  sh_g[tid] = gs;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      sh_v[tid] += sh_v[tid + s];
      sh_g[tid] += sh_g[tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    row_val[r] = sh_v[0];
    row_gsum[r] = sh_g[0];
  }
}

// Poison flags (triplet.h; nullptr when not wanted, p_col_own/d_o also without column terms): every
// writer stores the same value 1, so concurrent stores from several threads/blocks are harmless.
template <typename acc_t>
__global__ void rows_max_kernel(const acc_t* __restrict__ S, const acc_t* __restrict__ d_a,
                                const int64_t* __restrict__ a_ids, const int64_t* __restrict__ o_ids, int64_t N,
                                acc_t margin, acc_t gamma, acc_t* __restrict__ row_val, int64_t* __restrict__ row_arg,
                                acc_t* __restrict__ row_coef, const acc_t* __restrict__ d_o, int32_t* p_row_own,
                                int32_t* p_row_any, int32_t* p_col_own, int32_t* p_col_any) {
  __shared__ acc_t sh_v[kThreads];
  __shared__ acc_t sh_k[kThreads];
  __shared__ int64_t sh_i[kThreads];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const acc_t* sr = S + r * N;
  const acc_t dr = d_a[r];
  const int64_t ar = a_ids[r];
  acc_t best = acc_t(-1), best_df = 0;
  int64_t arg = N;  // larger than every index: loses every tie (only kept by threads with no column)
  const acc_t inf = pos_inf<acc_t>();
  for (int64_t j = tid; j < N; j += kThreads) {  // ascending j, strict '>' (or first NaN)
    acc_t df;
    const bool masked = o_ids[j] == ar;
    const acc_t c = (margin + sr[j]) - dr;
    const acc_t f = focal<acc_t>(c, masked, gamma, &df);
    if (max_takes(f, best)) {
      best = f;
      best_df = df;
      arg = j;
    }
    if (p_row_any != nullptr && !masked) {
      const bool own = c == inf;
      const bool other = d_o != nullptr && (margin + sr[j]) - d_o[j] == inf;
      if (own || other) {
        if (own) p_row_own[r] = 1;
        p_row_any[r] = 1;
        if (other) p_col_own[j] = 1;
        p_col_any[j] = 1;
      }
    }
  }
  sh_v[tid] = best;
  sh_k[tid] = best_df;
  sh_i[tid] = arg;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const acc_t vb = sh_v[tid + s];
      const int64_t ib = sh_i[tid + s];
      if (max_beats(vb, ib, sh_v[tid], sh_i[tid])) {  // larger, first NaN, or equal with a lower index
        sh_v[tid] = vb;
        sh_i[tid] = ib;
        sh_k[tid] = sh_k[tid + s];
      }
    }
    __syncthreads();
  }
  if (tid == 0) {
    row_val[r] = sh_v[0];
    row_arg[r] = sh_i[0];
    row_coef[r] = sh_k[0];
  }
}

// ---------------------------------------------------------------- cols pass
template <typename acc_t>
__global__ void cols_sum_kernel(const acc_t* __restrict__ S, acc_t* __restrict__ G, const acc_t* __restrict__ d_o,
                                const int64_t* __restrict__ a_ids, const int64_t* __restrict__ o_ids, int64_t R,
                                int64_t N, int64_t rows_per_seg, acc_t margin, acc_t gamma, bool write_g,
                                acc_t* __restrict__ part_v, acc_t* __restrict__ part_g) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t seg = blockIdx.y;
  if (j >= N) return;
  const int64_t r0 = seg * rows_per_seg;
  const int64_t r1 = r0 + rows_per_seg < R ? r0 + rows_per_seg : R;
  const acc_t dj = d_o[j];
  const int64_t oj = o_ids[j];
  acc_t v = 0, gs = 0;
  for (int64_t r = r0; r < r1; ++r) {  // coalesced across the warp: consecutive j
    acc_t df;
    const acc_t f = focal<acc_t>((margin + S[r * N + j]) - dj, oj == a_ids[r], gamma, &df);
    v += f;
    gs += df;
    if (write_g) G[r * N + j] += df;  // the rows pass wrote f'(cr) here, earlier on this stream
  }
  part_v[seg * N + j] = v;
  part_g[seg * N + j] = gs;
}

template <typename acc_t>
__global__ void cols_sum_fold_kernel(const acc_t* __restrict__ part_v, const acc_t* __restrict__ part_g, int64_t nseg,
                                     int64_t N, acc_t* __restrict__ col_val, acc_t* __restrict__ col_gsum) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= N) return;
  acc_t v = 0, gs = 0;
  for (int64_t s = 0; s < nseg; ++s) {
    v += part_v[s * N + j];
    gs += part_g[s * N + j];
  }
  col_val[j] += v;
  col_gsum[j] += gs;
}

template <typename acc_t>
__global__ void cols_max_kernel(const acc_t* __restrict__ S, const acc_t* __restrict__ d_o,
                                const int64_t* __restrict__ a_ids, const int64_t* __restrict__ o_ids, int64_t R,
                                int64_t N, int64_t rows_per_seg, int64_t row_offset, acc_t margin, acc_t gamma,
                                acc_t* __restrict__ part_v, int64_t* __restrict__ part_i, acc_t* __restrict__ part_k) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t seg = blockIdx.y;
  if (j >= N) return;
  const int64_t r0 = seg * rows_per_seg;
  const int64_t r1 = r0 + rows_per_seg < R ? r0 + rows_per_seg : R;
  const acc_t dj = d_o[j];
  const int64_t oj = o_ids[j];
  acc_t best = acc_t(-1), best_df = 0;
  int64_t arg = row_offset + r0;
  for (int64_t r = r0; r < r1; ++r) {  // increasing rows, strict '>' (or first NaN)
    acc_t df;
    const acc_t f = focal<acc_t>((margin + S[r * N + j]) - dj, oj == a_ids[r], gamma, &df);
    if (max_takes(f, best)) {
      best = f;
      best_df = df;
      arg = row_offset + r;
    }
  }
  part_v[seg * N + j] = best;
  part_i[seg * N + j] = arg;
  part_k[seg * N + j] = best_df;
}

template <typename acc_t>
__global__ void cols_max_fold_kernel(const acc_t* __restrict__ part_v, const int64_t* __restrict__ part_i,
                                     const acc_t* __restrict__ part_k, int64_t nseg, int64_t N,
                                     acc_t* __restrict__ col_val, int64_t* __restrict__ col_arg,
                                     acc_t* __restrict__ col_coef) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= N) return;
  acc_t best = col_val[j];
  int64_t arg = col_arg[j];
  acc_t k = col_coef[j];
  for (int64_t s = 0; s < nseg; ++s) {  // segments hold increasing rows, after all earlier chunks
    const acc_t v = part_v[s * N + j];
    if (max_takes(v, best)) {
      best = v;
      arg = part_i[s * N + j];
      k = part_k[s * N + j];
    }
  }
  col_val[j] = best;
  col_arg[j] = arg;
  col_coef[j] = k;
}

// ---------------------------------------------------------------- sparse scatter
template <typename acc_t>
__global__ void scatter_sorted_kernel(acc_t* __restrict__ out, const int64_t* __restrict__ keys,
                                      const int64_t* __restrict__ perm, const acc_t* __restrict__ coef,
                                      const acc_t* __restrict__ src, int64_t K, int64_t D) {
  const int64_t row = blockIdx.x;
  // lower_bound / upper_bound of `row` in keys (every thread computes the same, from global memory)
  int64_t lo = 0, hi = K;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < row) lo = mid + 1; else hi = mid;
  }
  int64_t end = lo, top = K;
  while (end < top) {
    const int64_t mid = (end + top) / 2;
    if (keys[mid] <= row) end = mid + 1; else top = mid;
  }
  if (lo == end) return;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
    acc_t acc = out[row * D + e];
    for (int64_t t = lo; t < end; ++t) {  // increasing source index (stable sort)
      const int64_t i = perm[t];
      acc += coef[i] * src[i * D + e];
    }
    out[row * D + e] = acc;
  }
}

// Rows per column segment: enough (row segment × column) threads to fill the GPU, each walking at
// least 32 rows so that the folded partials stay few.
int64_t rows_per_segment(int64_t R, int64_t N) {
  const int64_t target_threads = int64_t(1) << 18;
  int64_t nseg = std::max<int64_t>(1, std::min<int64_t>(ceil_div(R, 32), ceil_div(target_threads, N)));
  return ceil_div(R, nseg);
}

void check_pass(const at::Tensor& S, const at::Tensor& G) {
  TORCH_CHECK(S.is_cuda() && S.is_contiguous(), "triplet rows/cols pass: S must be contiguous on CUDA");
  TORCH_CHECK(G.numel() == 0 || (G.sizes() == S.sizes() && G.is_contiguous()), "triplet pass: bad G buffer");
}

}  // namespace

void rows_pass_cuda(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_a, const at::Tensor& a_ids,
                    const at::Tensor& o_ids, const PassArgs& p, at::Tensor& row_val, at::Tensor& row_gsum,
                    at::Tensor& row_arg, at::Tensor& row_coef, const at::Tensor& d_o, Poison* poison) {
  check_pass(S, G);
  const c10::cuda::CUDAGuard guard(S.device());
  const int64_t R = S.size(0), N = S.size(1);
  if (R == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor da = d_a.contiguous(), ai = a_ids.contiguous(), oi = o_ids.contiguous();
  const bool with_cols = poison != nullptr && poison->col_own.defined();
  const at::Tensor dd = with_cols ? d_o.contiguous() : d_o;
  int32_t* p_row_own = poison ? poison->row_own.data_ptr<int32_t>() : nullptr;
  int32_t* p_row_any = poison ? poison->row_any.data_ptr<int32_t>() : nullptr;
  int32_t* p_col_any = poison ? poison->col_any.data_ptr<int32_t>() : nullptr;
  int32_t* p_col_own = with_cols ? poison->col_own.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "triplet_rows_pass_cuda", [&] {
    const scalar_t m = static_cast<scalar_t>(p.margin), g = static_cast<scalar_t>(p.gamma);
    if (!p.max_violation) {
      const bool write_g = p.need_grad;
      rows_sum_kernel<scalar_t><<<R, kThreads, 0, stream>>>(
          S.data_ptr<scalar_t>(), write_g ? G.data_ptr<scalar_t>() : nullptr, da.data_ptr<scalar_t>(),
          ai.data_ptr<int64_t>(), oi.data_ptr<int64_t>(), N, m, g, write_g, row_val.data_ptr<scalar_t>(),
          row_gsum.data_ptr<scalar_t>());
    } else {
      rows_max_kernel<scalar_t><<<R, kThreads, 0, stream>>>(
          S.data_ptr<scalar_t>(), da.data_ptr<scalar_t>(), ai.data_ptr<int64_t>(), oi.data_ptr<int64_t>(), N, m, g,
          row_val.data_ptr<scalar_t>(), row_arg.data_ptr<int64_t>(), row_coef.data_ptr<scalar_t>(),
          with_cols ? dd.data_ptr<scalar_t>() : nullptr, p_row_own, p_row_any, p_col_own, p_col_any);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cols_pass_cuda(const at::Tensor& S, at::Tensor& G, const at::Tensor& d_o, const at::Tensor& a_ids,
                    const at::Tensor& o_ids, int64_t row_offset, const PassArgs& p, at::Tensor& col_val,
                    at::Tensor& col_gsum, at::Tensor& col_arg, at::Tensor& col_coef) {
  check_pass(S, G);
  const c10::cuda::CUDAGuard guard(S.device());
  const int64_t R = S.size(0), N = S.size(1);
  if (R == 0 || N == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor dd = d_o.contiguous(), ai = a_ids.contiguous(), oi = o_ids.contiguous();
  const int64_t rps = rows_per_segment(R, N);
  const int64_t nseg = ceil_div(R, rps);
  TORCH_CHECK(nseg <= 65535, "triplet cols pass: too many row segments");
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads)), static_cast<unsigned>(nseg));
  const dim3 fold_grid(static_cast<unsigned>(ceil_div(N, kThreads)));
  const auto fopt = S.options();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "triplet_cols_pass_cuda", [&] {
    const scalar_t m = static_cast<scalar_t>(p.margin), g = static_cast<scalar_t>(p.gamma);
    at::Tensor part_v = at::empty({nseg, N}, fopt);
    if (!p.max_violation) {
      const bool write_g = p.need_grad;
      at::Tensor part_g = at::empty({nseg, N}, fopt);
      cols_sum_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          S.data_ptr<scalar_t>(), write_g ? G.data_ptr<scalar_t>() : nullptr, dd.data_ptr<scalar_t>(),
          ai.data_ptr<int64_t>(), oi.data_ptr<int64_t>(), R, N, rps, m, g, write_g, part_v.data_ptr<scalar_t>(),
          part_g.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cols_sum_fold_kernel<scalar_t><<<fold_grid, kThreads, 0, stream>>>(
          part_v.data_ptr<scalar_t>(), part_g.data_ptr<scalar_t>(), nseg, N, col_val.data_ptr<scalar_t>(),
          col_gsum.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor part_i = at::empty({nseg, N}, fopt.dtype(at::kLong));
      at::Tensor part_k = at::empty({nseg, N}, fopt);
      cols_max_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          S.data_ptr<scalar_t>(), dd.data_ptr<scalar_t>(), ai.data_ptr<int64_t>(), oi.data_ptr<int64_t>(), R, N, rps,
          row_offset, m, g, part_v.data_ptr<scalar_t>(), part_i.data_ptr<int64_t>(), part_k.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cols_max_fold_kernel<scalar_t><<<fold_grid, kThreads, 0, stream>>>(
          part_v.data_ptr<scalar_t>(), part_i.data_ptr<int64_t>(), part_k.data_ptr<scalar_t>(), nseg, N,
          col_val.data_ptr<scalar_t>(), col_arg.data_ptr<int64_t>(), col_coef.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void scatter_sorted_cuda(at::Tensor& out, const at::Tensor& keys, const at::Tensor& perm, const at::Tensor& coef,
                         const at::Tensor& src) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && src.is_contiguous() && coef.is_contiguous(),
              "triplet scatter: contiguous CUDA tensors expected");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t M = out.size(0), D = out.size(1), K = keys.size(0);
  if (M == 0 || K == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(D, 32) * 32)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "triplet_scatter_sorted_cuda", [&] {
    scatter_sorted_kernel<scalar_t><<<M, threads, 0, stream>>>(
        out.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), coef.data_ptr<scalar_t>(),
        src.data_ptr<scalar_t>(), K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace triplet
}  // namespace rspeft
