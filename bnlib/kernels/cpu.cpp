// The CPU backend (loaded by cpu.py): training-mode BN for small inputs, one call per direction.
// Same formulas as the composed backend (book/derivations/backward.ipynb): forward: two-pass
// statistics (a first mean c0, then sums of d = x - c0 and d^2), y = d * scale + shift;
// backward: sum(dy) and sum(dy (x - mean)) in one sweep over (dy, x), then dx in one pass.
// Accuracy: values are centred on c0 before anything is squared or summed (no E[x^2] - E[x]^2,
// no rounded deviations at a large offset); partial sums in the input's dtype over at most 64
// values, then in double. Saves only the per-channel mean and inverse std, like torch's kernel.
// Single-threaded: bnlib.kernels uses it up to a size threshold (cpu.py). x is (N, C, *) and
// dense, seen as (outer, C, inner): channel-major with inner = prod(*), or channel-innermost
// (2D, or 4D channels-last) with outer = N * prod(*) and inner = 1.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

struct Layout { int64_t outer, channels, inner; };

Layout layout_of(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(n > 0 && c > 0, "bnlib CPU kernel: input must not be empty, got shape ", x.sizes());
  const int64_t s = x.numel() / (n * c);
  if (x.is_contiguous()) return {n, c, s};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {n * s, c, 1};
  TORCH_CHECK(false, "bnlib CPU kernel: input must be contiguous or channels-last, got strides ",
              x.strides());
}

// Values summed in the input's dtype before their partial sum is added into double: rows of a
// channel-innermost layout, consecutive values of one channel in a channel-major one.
constexpr int64_t kBlock = 16, kChunk = 64;
// Channel-innermost rows with few channels are walked R at a time, as one wide row of
// W = R * C values with every per-channel vector repeated R times, so that the vector loop is
// long enough to pay for itself (16 channels would otherwise mean loops of 16).
constexpr int64_t kWideRow = 256;
int64_t rows_per_wide_row(int64_t channels) { return std::max<int64_t>(1, kWideRow / channels); }

template <typename T>
std::vector<T> repeated(const T* v, int64_t channels, int64_t times) {
  std::vector<T> out(channels * times);
  for (int64_t r = 0; r < times; ++r) std::copy(v, v + channels, out.begin() + r * channels);
  return out;
}

// Per channel: s1 += p and (kSecond) s2 += p * e, where e = b - center[c] and p = a (kHasA) or e.
// Forward (no a, b = x, center = a first mean): sum(d), sum(d^2) with d = x - center.
// Backward (a = dy, b = x, center = the saved mean): sum(dy), sum(dy (x - mean)).
template <typename scalar_t, bool kHasA, bool kSecond = true>
void centred_sums(const scalar_t* a, const scalar_t* b, const scalar_t* center, const Layout& L,
                  double* s1, double* s2) {
  const int64_t C = L.channels;
  if (L.inner == 1) {
    const int64_t R = rows_per_wide_row(C), W = R * C, wide = L.outer / R;
    const std::vector<scalar_t> cen = repeated(center, C, R);
    std::vector<scalar_t> t1(W, scalar_t(0)), t2(W, scalar_t(0));
    const scalar_t* cp = cen.data();
    scalar_t *p1 = t1.data(), *p2 = t2.data();
    // Partial sums of at most kBlock (wide) rows, then into double.
    auto flush = [&]() {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) {  // no j % C: an integer division per value is slow
          s1[c] += p1[r * C + c];
          if (kSecond) s2[c] += p2[r * C + c];
        }
      std::fill(t1.begin(), t1.end(), scalar_t(0)), std::fill(t2.begin(), t2.end(), scalar_t(0));
    };
    auto accumulate = [&](int64_t offset, int64_t n) {
      const scalar_t* br = b + offset;
      const scalar_t* ar = kHasA ? a + offset : br;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t e = br[j] - cp[j];
        const scalar_t p = kHasA ? ar[j] : e;
        p1[j] += p;
        if (kSecond) p2[j] += p * e;
      }
    };
    for (int64_t g = 0; g < wide; ++g) {
      accumulate(g * W, W);
      if ((g + 1) % kBlock == 0) flush();
    }
    flush();
    for (int64_t o = wide * R; o < L.outer; ++o) {  // the last outer % R rows, one at a time
      accumulate(o * C, C);
      if ((o - wide * R + 1) % kBlock == 0) flush();
    }
    flush();
    return;
  }
  for (int64_t oc = 0; oc < L.outer * C; ++oc) {
    const int64_t c = oc % C;
    const scalar_t cc = center[c];
    const scalar_t* br = b + oc * L.inner;
    const scalar_t* ar = kHasA ? a + oc * L.inner : br;
    for (int64_t i0 = 0; i0 < L.inner; i0 += kChunk) {
      const int64_t i1 = std::min(i0 + kChunk, L.inner);
      scalar_t q1 = 0, q2 = 0;
#pragma omp simd reduction(+ : q1, q2)
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t e = br[i] - cc;
        const scalar_t p = kHasA ? ar[i] : e;
        q1 += p;
        if (kSecond) q2 += p * e;
      }
      s1[c] += q1;
      if (kSecond) s2[c] += q2;
    }
  }
}

// out = p * u[c] + (b - center[c]) * v[c] + w[c], with p = a (kHasA) or absent.
template <typename scalar_t, bool kHasA>
void centred_affine(const scalar_t* a, const scalar_t* b, const scalar_t* center,
                    const scalar_t* u, const scalar_t* v, const scalar_t* w, const Layout& L,
                    scalar_t* out) {
  const int64_t C = L.channels;
  if (L.inner == 1) {
    const int64_t R = rows_per_wide_row(C), W = R * C, wide = L.outer / R;
    const std::vector<scalar_t> cen = repeated(center, C, R), vr = repeated(v, C, R),
                                wr = repeated(w, C, R),
                                ur = kHasA ? repeated(u, C, R) : std::vector<scalar_t>();
    const scalar_t *cp = cen.data(), *vp = vr.data(), *wp = wr.data(), *up = ur.data();
    auto row = [&](int64_t offset, int64_t n) {
      const scalar_t* br = b + offset;
      const scalar_t* ar = kHasA ? a + offset : br;
      scalar_t* outr = out + offset;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        outr[j] = (kHasA ? ar[j] * up[j] : scalar_t(0)) + (br[j] - cp[j]) * vp[j] + wp[j];
    };
    for (int64_t g = 0; g < wide; ++g) row(g * W, W);
    for (int64_t o = wide * R; o < L.outer; ++o) row(o * C, C);
    return;
  }
  for (int64_t oc = 0; oc < L.outer * C; ++oc) {
    const int64_t c = oc % C;
    const scalar_t cc = center[c], uc = u[c], vc = v[c], wc = w[c];
    const scalar_t* br = b + oc * L.inner;
    const scalar_t* ar = kHasA ? a + oc * L.inner : br;
    scalar_t* outr = out + oc * L.inner;
#pragma omp simd
    for (int64_t i = 0; i < L.inner; ++i)
      outr[i] = (kHasA ? ar[i] * uc : scalar_t(0)) + (br[i] - cc) * vc + wc;
  }
}

template <typename scalar_t>
const scalar_t* data_or_null(const c10::optional<at::Tensor>& t) {
  return t && t->defined() ? t->const_data_ptr<scalar_t>() : nullptr;
}
template <typename scalar_t>
scalar_t* mutable_or_null(const c10::optional<at::Tensor>& t) {
  return t && t->defined() ? t->mutable_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
  const Layout L = layout_of(x);
  const int64_t C = L.channels;
  const double m = static_cast<double>(L.outer * L.inner);  // values per channel
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  // First pass: a first mean c0 (its rounding is corrected below).
  std::vector<scalar_t> zero(C, scalar_t(0)), c0(C);
  std::vector<double> sum_x(C, 0.0);
  centred_sums<scalar_t, false, false>(nullptr, xp, zero.data(), L, sum_x.data(), nullptr);
  for (int64_t c = 0; c < C; ++c) c0[c] = static_cast<scalar_t>(sum_x[c] / m);
  // Second pass: sum(d) and sum(d^2), d = x - c0; mean(d) is c0's error.
  std::vector<double> sum_d(C, 0.0), sum_dd(C, 0.0);
  centred_sums<scalar_t, false>(nullptr, xp, c0.data(), L, sum_d.data(), sum_dd.data());
  auto opts = x.options();
  at::Tensor save_mean = at::empty({C}, opts), save_invstd = at::empty({C}, opts);
  scalar_t *smp = save_mean.mutable_data_ptr<scalar_t>(), *sip = save_invstd.mutable_data_ptr<scalar_t>();
  const scalar_t *wp = data_or_null<scalar_t>(weight), *bp = data_or_null<scalar_t>(bias);
  scalar_t *rmp = mutable_or_null<scalar_t>(running_mean), *rvp = mutable_or_null<scalar_t>(running_var);
  std::vector<scalar_t> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const double dmean = sum_d[c] / m;
    const double mean = double(c0[c]) + dmean;
    const double var = std::max(sum_dd[c] / m - dmean * dmean, 0.0);
    const double invstd = 1.0 / std::sqrt(var + eps);
    const double s = wp ? invstd * double(wp[c]) : invstd;
    smp[c] = static_cast<scalar_t>(mean);
    sip[c] = static_cast<scalar_t>(invstd);
    scale[c] = static_cast<scalar_t>(s);
    shift[c] = static_cast<scalar_t>((bp ? double(bp[c]) : 0.0) - dmean * s);  // y = s (d - mean(d)) + beta
    // Running statistics, as torch.nn.functional.batch_norm updates them: the unbiased
    // (m / (m - 1)) batch variance, r <- (1 - momentum) r + momentum * batch statistic.
    if (rmp) rmp[c] = static_cast<scalar_t>((1 - momentum) * double(rmp[c]) + momentum * mean);
    if (rvp) rvp[c] = static_cast<scalar_t>((1 - momentum) * double(rvp[c]) + momentum * var * m / (m - 1));
  }
  at::Tensor y = at::empty_like(x);
  centred_affine<scalar_t, false>(nullptr, xp, c0.data(), nullptr, scale.data(), shift.data(), L,
                                  y.mutable_data_ptr<scalar_t>());
  return {y, save_mean, save_invstd};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& dy_in, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool need_dx) {
  const Layout L = layout_of(x);
  const int64_t C = L.channels;
  const double m = static_cast<double>(L.outer * L.inner);  // values per channel
  // dy in the layout layout_of chose for x, so both are walked with the same offsets. (Not
  // x.suggest_memory_format(): its stride heuristic can name the other layout when a size-1
  // axis has an unusual stride, e.g. a single HWC image permuted to (1, C, H, W).)
  const auto fmt = x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const at::Tensor dy = dy_in.is_contiguous(fmt) ? dy_in : dy_in.contiguous(fmt);
  const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t *mean = save_mean.const_data_ptr<scalar_t>(), *invstd = save_invstd.const_data_ptr<scalar_t>();
  const scalar_t* wp = data_or_null<scalar_t>(weight);
  // Both reductions in one sweep: sum(dy) and sum(dy (x - mean)).
  std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
  centred_sums<scalar_t, true>(dyp, xp, mean, L, sum_dy.data(), sum_dy_xmu.data());
  auto opts = x.options();
  at::Tensor dweight = at::empty({C}, opts), dbias = at::empty({C}, opts);
  scalar_t *dwp = dweight.mutable_data_ptr<scalar_t>(), *dbp = dbias.mutable_data_ptr<scalar_t>();
  // dx = a dy + b x_hat + c per channel (the book's coefficients: a = gamma invstd,
  // b = -a sum(dy x_hat) / m, c = -a sum(dy) / m), written as a dy + (b invstd) (x - mean) + c.
  std::vector<scalar_t> coef_a(C), coef_b_invstd(C), coef_c(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = double(invstd[c]);
    dwp[c] = static_cast<scalar_t>(sum_dy_xmu[c] * is);  // dl/dgamma = sum(dy x_hat)
    dbp[c] = static_cast<scalar_t>(sum_dy[c]);        // dl/dbeta = sum(dy)
    const double a = wp ? is * double(wp[c]) : is;
    coef_a[c] = static_cast<scalar_t>(a);
    coef_b_invstd[c] = static_cast<scalar_t>(-a * is * is * sum_dy_xmu[c] / m);
    coef_c[c] = static_cast<scalar_t>(-a * sum_dy[c] / m);
  }
  if (!need_dx) return {at::Tensor(), dweight, dbias};
  at::Tensor dx = at::empty_like(x);
  centred_affine<scalar_t, true>(dyp, xp, mean, coef_a.data(), coef_b_invstd.data(), coef_c.data(), L,
                                 dx.mutable_data_ptr<scalar_t>());
  return {dx, dweight, dbias};
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "bnlib CPU kernel: ", name, " must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "bnlib CPU kernel: ", name, " must be float32 or float64, got ", x.scalar_type());
}

// A per-channel tensor: (C,), contiguous, on the CPU, in x's dtype.
void check_param(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t || !t->defined()) return;
  const auto dtype = x.scalar_type();
  TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu() && t->is_contiguous() &&
                  t->dim() == 1 && t->size(0) == x.size(1),
              "bnlib CPU kernel: ", name, " must be a contiguous CPU tensor of shape (",
              x.size(1), ",) and dtype ", dtype, ", got ", t->sizes(), " ", t->scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
  check_input(x, "input");
  TORCH_CHECK(x.dim() >= 2 && x.size(1) > 0 && x.numel() > x.size(1),
              "bnlib CPU kernel: input must be (N, C, *) with more than one value per channel, "
              "got shape ", x.sizes());
  check_param(weight, x, "weight"), check_param(bias, x, "bias");
  check_param(running_mean, x, "running_mean"), check_param(running_var, x, "running_var");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_forward", [&] {
    return forward_impl<scalar_t>(x, weight, bias, running_mean, running_var, momentum, eps);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool need_dx) {
  check_input(x, "input");
  check_input(dy, "grad_output");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "bnlib CPU kernel: grad_output must have input's shape ", x.sizes(), " and dtype ",
              x.scalar_type(), ", got ", dy.sizes(), " ", dy.scalar_type());
  check_param(weight, x, "weight"), check_param(save_mean, x, "save_mean");
  check_param(save_invstd, x, "save_invstd");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_backward", [&] {
    return backward_impl<scalar_t>(dy, x, weight, save_mean, save_invstd, need_dx);
  });
}

}  // namespace

TORCH_LIBRARY(bnlib, m) {
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("backward(Tensor grad_output, Tensor x, Tensor? weight, Tensor save_mean, "
        "Tensor save_invstd, bool need_dx) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnlib, CPU, m) { m.impl("forward", forward), m.impl("backward", backward); }
