// CPU kernel of the per-class batch moments.
//
// Pixels are bucketed by label with one counting sort. Means come from per-thread float64 sums over row
// chunks; diagonal variances from a second such pass over the centred values; full covariances from one
// (A x m_k)(m_k x A) product per class over that class's centred rows. No N x K x A expansion, no one-hot.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../../common.h"
#include "../class_moments.h"

namespace sdca {
namespace {

// Per-class sums of f(row, class) over all labelled rows, accumulated in float64 by row chunks, one buffer
// per thread, then reduced. `center` (nullable) is subtracted and the result squared when given.
template <typename scalar_t>
at::Tensor class_sums(const at::Tensor& x, const int64_t* y, int64_t K, const double* center) {
  const int64_t N = x.size(0), A = x.size(1);
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * K * A, 0.0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * K * A;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = y[i];
      if (k < 0) continue;  // ignored pixel
      const scalar_t* row = xp + i * A;
      double* out = acc + k * A;
      if (center == nullptr) {
        for (int64_t a = 0; a < A; ++a) out[a] += static_cast<double>(row[a]);
      } else {
        const double* c = center + k * A;
        for (int64_t a = 0; a < A; ++a) {
          const double d = static_cast<double>(row[a]) - c[a];
          out[a] += d * d;
        }
      }
    }
  });
  at::Tensor total = at::zeros({K, A}, at::kDouble);
  double* tp = total.data_ptr<double>();
  for (int t = 0; t < threads; ++t) {
    const double* src = partial.data() + static_cast<size_t>(t) * K * A;
    for (int64_t j = 0; j < K * A; ++j) tp[j] += src[j];
  }
  return total;
}

// Pixels grouped by class with one counting sort: y[i] is the class of pixel i (-1 when ignored), the pixels
// of class k are order[offset[k] .. offset[k] + count[k]).
struct Buckets {
  std::vector<int64_t> y, count, offset;
  at::Tensor order;
};

Buckets bucket_by_class(const at::Tensor& labels, int64_t K, int64_t ignore_index, const char* op) {
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t N = lab.size(0);
  const int64_t* lp = lab.data_ptr<int64_t>();
  Buckets b;
  b.y.resize(N);
  b.count.assign(K, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = lp[i];
    if (k == ignore_index) {
      b.y[i] = -1;
      continue;
    }
    TORCH_CHECK(k >= 0 && k < K, op, ": label ", k, " outside [0, ", K, ") and not ignore_index ", ignore_index);
    b.y[i] = k;
    ++b.count[k];
  }
  b.offset.assign(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) b.offset[k + 1] = b.offset[k] + b.count[k];
  b.order = at::empty({b.offset[K]}, at::kLong);
  int64_t* op_ = b.order.data_ptr<int64_t>();
  std::vector<int64_t> cursor(b.offset.begin(), b.offset.end() - 1);
  for (int64_t i = 0; i < N; ++i)
    if (b.y[i] >= 0) op_[cursor[b.y[i]]++] = i;
  return b;
}

at::Tensor inverse_counts(const Buckets& b) {
  at::Tensor inv = at::empty({static_cast<int64_t>(b.count.size()), 1}, at::kDouble);
  double* p = inv.data_ptr<double>();
  for (size_t k = 0; k < b.count.size(); ++k) p[k] = 1.0 / static_cast<double>(std::max<int64_t>(b.count[k], 1));
  return inv;
}

// Batch means (and diagonal variances when var64 != nullptr), float64 [K, A].
void batch_means(const at::Tensor& x, const Buckets& b, int64_t K, at::Tensor& mean64, at::Tensor* var64) {
  const at::Tensor inv = inverse_counts(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sdca_batch_means", [&] {
    mean64 = class_sums<scalar_t>(x, b.y.data(), K, nullptr).mul_(inv);
    if (var64 != nullptr) *var64 = class_sums<scalar_t>(x, b.y.data(), K, mean64.data_ptr<double>()).mul_(inv);
  });
}

// The centred rows of class k, at the accumulation type (a [count_k, A] copy: the largest class bounds it).
at::Tensor centred_rows(const at::Tensor& x, const Buckets& b, int64_t k, const at::Tensor& mean_acc) {
  at::Tensor rows = x.index_select(0, b.order.narrow(0, b.offset[k], b.count[k])).to(mean_acc.scalar_type());
  return rows.sub_(mean_acc.select(0, k));
}

// Eq. 3-4 for one class, in place: Sigma <- a Sigma + b S + a b d d^T, where S is the batch covariance given
// as gram * gram_scale (gram = the centred Gram matrix, or the variance vector for a diagonal Sigma).
template <typename state_t, typename gram_t>
void merge_class(state_t* sigma, const gram_t* gram, double gram_scale, const double* delta, double a, double b,
                 int64_t A, bool full) {
  const double ab = a * b, bs = b * gram_scale;
  if (!full) {
    for (int64_t i = 0; i < A; ++i)
      sigma[i] = static_cast<state_t>(a * sigma[i] + bs * gram[i] + ab * delta[i] * delta[i]);
    return;
  }
  at::parallel_for(0, A, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      state_t* row = sigma + i * A;
      const gram_t* grow = gram + i * A;
      const double di = ab * delta[i];
#pragma omp simd
      for (int64_t j = 0; j < A; ++j) row[j] = static_cast<state_t>(a * row[j] + bs * grow[j] + di * delta[j]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                                 int64_t num_classes, bool full, int64_t ignore_index) {
  check_moments_inputs(features, labels, num_classes);
  TORCH_CHECK(features.device().is_cpu(), "sdca::class_moments (CPU kernel): features must be a CPU tensor");
  const int64_t A = features.size(1), K = num_classes;
  const at::Tensor x = features.contiguous();
  const Buckets b = bucket_by_class(labels, K, ignore_index, "sdca::class_moments");
  at::Tensor count = at::empty({K}, at::kLong);
  std::copy(b.count.begin(), b.count.end(), count.data_ptr<int64_t>());

  at::Tensor mean64, var64;
  batch_means(x, b, K, mean64, full ? nullptr : &var64);
  if (!full) return {count, mean64, var64};

  const at::Tensor mean = mean64.to(accumulation_type(x.scalar_type()));
  at::Tensor cov = at::zeros({K, A, A}, mean.options());
  for (int64_t k = 0; k < K; ++k) {
    if (b.count[k] == 0) continue;
    const at::Tensor rows = centred_rows(x, b, k, mean);
    at::Tensor out = cov.select(0, k);
    at::mm_out(out, rows.t(), rows);
    out.div_(static_cast<double>(b.count[k]));
  }
  return {count, mean64, cov};
}

void update_statistics_cpu(at::Tensor& count, at::Tensor& mean, at::Tensor& covariance, const at::Tensor& features,
                           const at::Tensor& labels, int64_t ignore_index) {
  check_update_inputs(count, mean, covariance, features, labels);
  TORCH_CHECK(features.device().is_cpu(), "sdca::update_statistics (CPU kernel): features must be a CPU tensor");
  const int64_t K = mean.size(0), A = mean.size(1);
  const bool full = covariance.dim() == 3;
  const at::Tensor x = features.contiguous();
  const Buckets b = bucket_by_class(labels, K, ignore_index, "sdca::update_statistics");
  at::Tensor mean64, var64;
  batch_means(x, b, K, mean64, full ? nullptr : &var64);
  const at::Tensor batch_mean = full ? mean64.to(accumulation_type(x.scalar_type())) : at::Tensor();
  at::Tensor gram = full ? at::empty({A, A}, batch_mean.options()) : at::Tensor();  // reused for every class
  int64_t* cp = count.data_ptr<int64_t>();
  std::vector<double> delta(A);

  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_statistics_cpu", [&] {
    using state_t = scalar_t;
    state_t* mu = mean.data_ptr<state_t>();
    state_t* sigma = covariance.data_ptr<state_t>();
    const double* m64 = mean64.data_ptr<double>();
    for (int64_t k = 0; k < K; ++k) {
      const int64_t m = b.count[k];
      if (m == 0) continue;  // classes absent from the batch are left untouched
      const double n = static_cast<double>(cp[k]);
      const double w_old = n / (n + m), w_new = m / (n + m);
      for (int64_t i = 0; i < A; ++i) delta[i] = m64[k * A + i] - static_cast<double>(mu[k * A + i]);
      if (full) {
        const at::Tensor rows = centred_rows(x, b, k, batch_mean);
        at::mm_out(gram, rows.t(), rows);
        AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "update_statistics_merge", [&] {
          merge_class<state_t, scalar_t>(sigma + k * A * A, gram.data_ptr<scalar_t>(), 1.0 / m, delta.data(), w_old,
                                         w_new, A, true);
        });
      } else {
        merge_class<state_t, double>(sigma + k * A, var64.data_ptr<double>() + k * A, 1.0, delta.data(), w_old, w_new,
                                     A, false);
      }
      for (int64_t i = 0; i < A; ++i) mu[k * A + i] = static_cast<state_t>(mu[k * A + i] + w_new * delta[i]);
      cp[k] += m;
    }
  });
}

TORCH_LIBRARY_IMPL(sdca, CPU, m) {
  m.impl("class_moments", &class_moments_cpu);
  m.impl("update_statistics", &update_statistics_cpu);
}

}  // namespace sdca
