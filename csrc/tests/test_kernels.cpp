// C++ unit tests of the CPU kernels against plain double-precision loops written from the formulas.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <vector>

#include "class_moments/class_moments.h"
#include "closed_form_loss/closed_form_loss.h"

namespace {

constexpr int64_t kIgnore = 255;

struct Problem {
  at::Tensor q, labels, mean, cov;
};

Problem make_problem(int64_t N, int64_t A, int64_t K, bool full, at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(seed);
  Problem p;
  p.q = at::randn({N, A}, at::kDouble);
  p.labels = at::randint(K, {N}, at::kLong);
  p.labels.masked_fill_(at::rand({N}) < 0.2, kIgnore);
  p.mean = at::randn({K, A}, at::kDouble);
  if (full) {
    at::Tensor root = at::randn({K, A, A}, at::kDouble) * 0.3;
    p.cov = at::bmm(root, root.transpose(1, 2));
  } else {
    p.cov = at::rand({K, A}, at::kDouble) * 0.3;
  }
  p.q = p.q.to(dtype);
  p.mean = p.mean.to(dtype);
  p.cov = p.cov.to(dtype);
  return p;
}

// Eq. 14 and its gradient for one pixel, in double, straight from the formulas:
// z_k = q.mu_k / tau + q^T S_k q / (2 tau^2), L = lse(z) - q.mu_y / tau,
// dL/dq = sum_k p_k (mu_k / tau + S_k q / tau^2) - mu_y / tau.
void naive_pixel(const std::vector<double>& q, int64_t y, const at::Tensor& mean, const at::Tensor& cov, double tau,
                 double* loss, std::vector<double>* grad) {
  const int64_t K = mean.size(0), A = mean.size(1);
  const bool full = cov.dim() == 3;
  auto mu = mean.accessor<double, 2>();
  std::vector<double> z(K);
  std::vector<std::vector<double>> sq(K, std::vector<double>(A, 0.0));
  for (int64_t k = 0; k < K; ++k) {
    double lin = 0, quad = 0;
    for (int64_t a = 0; a < A; ++a) {
      lin += q[a] * mu[k][a];
      if (full) {
        auto s = cov.accessor<double, 3>();
        for (int64_t b = 0; b < A; ++b) sq[k][a] += s[k][a][b] * q[b];
      } else {
        sq[k][a] = cov.accessor<double, 2>()[k][a] * q[a];
      }
      quad += q[a] * sq[k][a];
    }
    z[k] = lin / tau + quad / (2 * tau * tau);
  }
  double zmax = z[0];
  for (double v : z) zmax = std::max(zmax, v);
  double sum = 0;
  for (double v : z) sum += std::exp(v - zmax);
  const double lse = zmax + std::log(sum);
  double lin_y = 0;
  for (int64_t a = 0; a < A; ++a) lin_y += q[a] * mu[y][a];
  *loss = lse - lin_y / tau;
  grad->assign(A, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    const double p = std::exp(z[k] - lse);
    for (int64_t a = 0; a < A; ++a) (*grad)[a] += p * (mu[k][a] / tau + sq[k][a] / (tau * tau));
  }
  for (int64_t a = 0; a < A; ++a) (*grad)[a] -= mu[y][a] / tau;
}

void expect_loss_matches_naive(bool full, at::ScalarType dtype, double rtol) {
  const int64_t N = 37, A = 6, K = 4;
  const double tau = 0.7;
  Problem p = make_problem(N, A, K, full, dtype, full ? 1 : 2);
  auto [loss, grad] = sdca::closed_form_loss_cpu(p.q, p.labels, p.mean, p.cov, tau, false, kIgnore, true);
  ASSERT_EQ(loss.scalar_type(), dtype);
  const at::Tensor q64 = p.q.to(at::kDouble), mean64 = p.mean.to(at::kDouble), cov64 = p.cov.to(at::kDouble);
  const at::Tensor loss64 = loss.to(at::kDouble), grad64 = grad.to(at::kDouble);
  auto qa = q64.accessor<double, 2>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = p.labels[i].item<int64_t>();
    if (y == kIgnore) {
      EXPECT_EQ(loss64[i].item<double>(), 0.0);
      EXPECT_EQ(grad64[i].abs().sum().item<double>(), 0.0);
      continue;
    }
    std::vector<double> q(qa[i].data(), qa[i].data() + A), g;
    double l;
    naive_pixel(q, y, mean64, cov64, tau, &l, &g);
    EXPECT_NEAR(loss64[i].item<double>(), l, rtol * std::max(1.0, std::abs(l))) << "pixel " << i;
    for (int64_t a = 0; a < A; ++a)
      EXPECT_NEAR(grad64[i][a].item<double>(), g[a], rtol * std::max(1.0, std::abs(g[a]))) << "pixel " << i;
  }
}

TEST(ClosedFormLoss, FullCovarianceMatchesFormulaFloat64) { expect_loss_matches_naive(true, at::kDouble, 1e-11); }
TEST(ClosedFormLoss, DiagonalCovarianceMatchesFormulaFloat64) { expect_loss_matches_naive(false, at::kDouble, 1e-11); }
TEST(ClosedFormLoss, FullCovarianceMatchesFormulaFloat32) { expect_loss_matches_naive(true, at::kFloat, 1e-4); }
TEST(ClosedFormLoss, DiagonalCovarianceMatchesFormulaFloat32) { expect_loss_matches_naive(false, at::kFloat, 1e-4); }

TEST(ClosedFormLoss, NormalisedGradientIsProjected) {
  // With normalize, the gradient w.r.t. the raw q is orthogonal to q (the loss is scale-invariant in q).
  Problem p = make_problem(25, 5, 3, true, at::kDouble, 3);
  auto [loss, grad] = sdca::closed_form_loss_cpu(p.q, p.labels, p.mean, p.cov, 0.5, true, kIgnore, true);
  const at::Tensor radial = (grad * p.q).sum(1);
  EXPECT_LT(radial.abs().max().item<double>(), 1e-12);
  auto [loss_scaled, unused] =
      sdca::closed_form_loss_cpu(p.q * 3.0, p.labels, p.mean, p.cov, 0.5, true, kIgnore, false);
  EXPECT_TRUE(at::allclose(loss, loss_scaled, 1e-12, 1e-12));
  EXPECT_EQ(unused.numel(), 0);
}

TEST(ClosedFormLoss, RegisteredWithTheDispatcher) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("sdca::closed_form_loss", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, double, bool, int64_t, bool)>();
  Problem p = make_problem(9, 4, 3, false, at::kFloat, 4);
  auto [via_dispatch, g1] = op.call(p.q, p.labels, p.mean, p.cov, 0.5, false, kIgnore, false);
  auto [direct, g2] = sdca::closed_form_loss_cpu(p.q, p.labels, p.mean, p.cov, 0.5, false, kIgnore, false);
  EXPECT_TRUE(at::equal(via_dispatch, direct));
}

TEST(ClosedFormLoss, RejectsLabelsOutOfRange) {
  Problem p = make_problem(9, 4, 3, false, at::kFloat, 5);
  EXPECT_THROW(sdca::closed_form_loss_cpu(p.q, at::full({9}, 3, at::kLong), p.mean, p.cov, 0.5, false, kIgnore, false),
               c10::Error);
  EXPECT_THROW(sdca::closed_form_loss_cpu(p.q, p.labels, p.mean, p.cov.narrow(1, 0, 2), 0.5, false, kIgnore, false),
               c10::Error);
}

void expect_moments_match_naive(bool full) {
  const int64_t N = 200, A = 5, K = 4;
  at::manual_seed(7);
  at::Tensor x = at::randn({N, A}, at::kDouble) + 3.0;
  at::Tensor labels = at::randint(K - 1, {N}, at::kLong);  // class K-1 never occurs
  labels.masked_fill_(at::rand({N}) < 0.25, kIgnore);
  auto [count, mean, cov] = sdca::class_moments_cpu(x, labels, K, full, kIgnore);
  auto xa = x.accessor<double, 2>();
  auto la = labels.accessor<int64_t, 1>();
  for (int64_t k = 0; k < K; ++k) {
    std::vector<double> m(A, 0.0);
    int64_t n = 0;
    for (int64_t i = 0; i < N; ++i)
      if (la[i] == k) {
        ++n;
        for (int64_t a = 0; a < A; ++a) m[a] += xa[i][a];
      }
    ASSERT_EQ(count[k].item<int64_t>(), n);
    for (int64_t a = 0; a < A; ++a) m[a] = n ? m[a] / n : 0.0;
    for (int64_t a = 0; a < A; ++a) {
      EXPECT_NEAR(mean[k][a].item<double>(), m[a], 1e-12);
      for (int64_t b = 0; b < (full ? A : 1); ++b) {
        const int64_t bb = full ? b : a;
        double c = 0;
        for (int64_t i = 0; i < N; ++i)
          if (la[i] == k) c += (xa[i][a] - m[a]) * (xa[i][bb] - m[bb]);
        c = n ? c / n : 0.0;
        const double got = full ? cov[k][a][b].item<double>() : cov[k][a].item<double>();
        EXPECT_NEAR(got, c, 1e-12) << "class " << k << " entry " << a << "," << bb;
      }
    }
  }
}

TEST(ClassMoments, FullMatchesDefinition) { expect_moments_match_naive(true); }
TEST(ClassMoments, DiagonalMatchesDefinition) { expect_moments_match_naive(false); }

void expect_update_equals_pooled_statistics(bool full) {
  // Two batches merged in place must give the moments of their union (Eq. 3-4 is the exact pooled merge).
  const int64_t A = 4, K = 3;
  at::manual_seed(11);
  const at::Tensor x1 = at::randn({60, A}, at::kDouble) * 2 + 1, x2 = at::randn({25, A}, at::kDouble) - 3;
  at::Tensor l1 = at::randint(K, {60}, at::kLong), l2 = at::randint(K - 1, {25}, at::kLong);
  l1.masked_fill_(at::rand({60}) < 0.2, kIgnore);
  at::Tensor count = at::zeros({K}, at::kLong), mean = at::zeros({K, A}, at::kDouble);
  at::Tensor cov = full ? at::zeros({K, A, A}, at::kDouble) : at::zeros({K, A}, at::kDouble);
  sdca::update_statistics_cpu(count, mean, cov, x1, l1, kIgnore);
  sdca::update_statistics_cpu(count, mean, cov, x2, l2, kIgnore);
  auto [c, m, s] = sdca::class_moments_cpu(at::cat({x1, x2}), at::cat({l1, l2}), K, full, kIgnore);
  EXPECT_TRUE(at::equal(count, c));
  EXPECT_TRUE(at::allclose(mean, m, 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(cov, s, 1e-11, 1e-12));
}

TEST(UpdateStatistics, FullEqualsPooledMoments) { expect_update_equals_pooled_statistics(true); }
TEST(UpdateStatistics, DiagonalEqualsPooledMoments) { expect_update_equals_pooled_statistics(false); }

TEST(ClassMoments, RejectsLabelsOutOfRange) {
  at::Tensor x = at::randn({4, 3});
  EXPECT_THROW(sdca::class_moments_cpu(x, at::tensor({0, 1, 7, 0}, at::kLong), 3, true, kIgnore), c10::Error);
}

}  // namespace
