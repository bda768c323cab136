// bnlib::train: the CPU backend's training-mode call with its autograd node in C++ (loaded by
// cpu.py with cpu.cpp). An ordinary eager call then builds one C++ node, as torch's own kernel
// does, instead of a Python autograd.Function: at 100 x 500 that saves tens of microseconds per
// forward + backward, as long as the kernel itself takes (bench/, the Performance chapter).
// bnlib.functional sends only plain eager calls here; under torch.func, torch.compile or
// forward-mode AD its Python Function runs instead (a C++ node has no jvp or vmap rule).
// Backward is bnlib::backward (the compact form); with create_graph=True it is the same form in
// differentiable ATen operators, with the batch statistics recomputed from x so that the
// gradient itself can be differentiated.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = c10::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple kernel_forward(const at::Tensor& x, const Opt& weight, const Opt& bias,
                      const Opt& running_mean, const Opt& running_var, double momentum,
                      double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlib::forward", "")
                       .typed<Triple(const at::Tensor&, const Opt&, const Opt&, const Opt&,
                                     const Opt&, double, double)>();
  return op.call(x, weight, bias, running_mean, running_var, momentum, eps);
}

Triple kernel_backward(const at::Tensor& dy, const at::Tensor& x, const Opt& weight,
                       const at::Tensor& mean, const at::Tensor& invstd, bool need_dx) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlib::backward", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const Opt&,
                                     const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(dy, x, weight, mean, invstd, need_dx);
}

// The compact backward in differentiable operators (for create_graph=True).
Triple differentiable_backward(const at::Tensor& dy, const at::Tensor& x,
                               const at::Tensor& weight, double eps) {
  std::vector<int64_t> dims{0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  shape[1] = x.size(1);
  const double m = static_cast<double>(x.numel() / x.size(1));
  auto [var, mean] = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/true);
  const at::Tensor invstd = at::rsqrt(var + eps);
  const at::Tensor x_hat = (x - mean) * invstd;
  const at::Tensor sum_dy = dy.sum(dims, /*keepdim=*/true);
  const at::Tensor sum_dy_xhat = (dy * x_hat).sum(dims, /*keepdim=*/true);
  const at::Tensor a = weight.defined() ? invstd * weight.reshape(shape) : invstd;
  const at::Tensor dx = a * (dy - sum_dy / m - x_hat * (sum_dy_xhat / m));
  return {dx, sum_dy_xhat.reshape({-1}), sum_dy.reshape({-1})};
}

class CpuBatchNorm : public torch::autograd::Function<CpuBatchNorm> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Opt& weight,
                            const Opt& bias, const Opt& running_mean, const Opt& running_var,
                            double momentum, double eps) {
    auto [y, mean, invstd] = kernel_forward(x, weight, bias, running_mean, running_var,
                                            momentum, eps);
    for (const Opt& t : {running_mean, running_var})  // written in C++: tell autograd
      if (t && t->defined()) t->unsafeGetTensorImpl()->bump_version();
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean, invstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    // needs_input_grad counts only the tensors given: x, then weight and bias where present.
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dweight = weight.defined() && ctx->needs_input_grad(1);
    const bool need_dbias =
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    at::Tensor dx, dweight, dbias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      std::tie(dx, dweight, dbias) = differentiable_backward(
          grads[0], x, weight, ctx->saved_data["eps"].toDouble());
    } else {
      std::tie(dx, dweight, dbias) = kernel_backward(
          grads[0].to(x.scalar_type()), x, weight.defined() ? Opt(weight) : Opt(), saved[2],
          saved[3], need_dx);
    }
    return {need_dx ? dx : at::Tensor(), need_dweight ? dweight : at::Tensor(),
            need_dbias ? dbias : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor train_autograd(const at::Tensor& x, const Opt& weight, const Opt& bias,
                          const Opt& running_mean, const Opt& running_var, double momentum,
                          double eps) {
  return CpuBatchNorm::apply(x, weight, bias, running_mean, running_var, momentum, eps);
}

// Below autograd (inference mode): the kernel's forward alone.
at::Tensor train_cpu(const at::Tensor& x, const Opt& weight, const Opt& bias,
                     const Opt& running_mean, const Opt& running_var, double momentum,
                     double eps) {
  return std::get<0>(kernel_forward(x, weight, bias, running_mean, running_var, momentum, eps));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnlib, m) {
  m.def("train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlib, Autograd, m) { m.impl("train", train_autograd); }
TORCH_LIBRARY_IMPL(bnlib, CPU, m) { m.impl("train", train_cpu); }
