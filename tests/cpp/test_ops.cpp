// masknorm from C++ with LibTorch only (no Python in the process): forward,
// backward and double backward through torch's C++ autograd, checked against
// torch::nn::BatchNorm1d, torch::nn::LayerNorm and at::rms_norm (at::batch_norm
// and at::layer_norm for double backward). Built and run by CTest (CMakeLists.txt).
#include <masknorm/ops.h>

#include <torch/torch.h>

#include <cctype>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAILED: " << what << "\n";
  }
}

void expect_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  const bool same_shape = actual.defined() && expected.defined() && actual.sizes() == expected.sizes();
  const bool ok = same_shape && at::allclose(actual, expected, /*rtol=*/1e-7, /*atol=*/1e-9);
  if (!ok && same_shape) {
    std::cerr << what << ": max abs difference " << (actual - expected).abs().max().item<double>() << "\n";
  }
  expect(ok, what);
}

bool python_in_process() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find("libpython") != std::string::npos || line.find("libtorch_python") != std::string::npos) {
      return true;
    }
  }
  return false;
}

// True at padding: sequence n has lengths[n] valid positions out of L.
at::Tensor padding_mask(std::vector<int64_t> lengths, int64_t L) {
  const auto len = torch::tensor(lengths).unsqueeze(1);
  return torch::arange(L).unsqueeze(0) >= len;
}

at::Tensor param(int64_t C, double low, double high) {
  return torch::empty({C}, torch::kDouble).uniform_(low, high).requires_grad_();
}

// Unmasked (N, C, L) batch norm in training: outputs, gradients, running statistics.
void batch_norm_matches_torch() {
  const int64_t N = 4, C = 5, L = 9;
  torch::nn::BatchNorm1d ref{torch::nn::BatchNorm1dOptions(C)};
  ref->to(torch::kDouble);
  const auto w = param(C, 0.5, 1.5), b = param(C, -1, 1);
  {
    torch::NoGradGuard no_grad;
    ref->weight.copy_(w);
    ref->bias.copy_(b);
  }
  const auto x = torch::randn({N, C, L}, torch::kDouble) * 3 + 2;
  const auto x_ref = x.clone().requires_grad_(), x_ours = x.clone().requires_grad_();
  auto running_mean = torch::zeros({C}, torch::kDouble), running_var = torch::ones({C}, torch::kDouble);
  auto num_batches_tracked = torch::zeros({}, torch::kLong);

  const auto y_ref = ref->forward(x_ref);
  // One call: statistics, normalization and the running-statistics update.
  auto [y, save_mean, save_invstd] = masknorm::batch_norm(
      x_ours, std::nullopt, w, b, running_mean, running_var, num_batches_tracked, /*training=*/true,
      /*momentum=*/0.1, 1e-5, /*channels_last=*/false);
  expect_close(y, y_ref, "batch_norm output");

  const auto grad = torch::randn_like(y);
  y.backward(grad);
  y_ref.backward(grad);
  expect_close(x_ours.grad(), x_ref.grad(), "batch_norm grad_input");
  expect_close(w.grad(), ref->weight.grad(), "batch_norm grad_weight");
  expect_close(b.grad(), ref->bias.grad(), "batch_norm grad_bias");
  expect_close(running_mean, ref->running_mean, "batch_norm running_mean");
  expect_close(running_var, ref->running_var, "batch_norm running_var");
  expect(num_batches_tracked.item<int64_t>() == 1, "batch_norm counts the batch in num_batches_tracked");

  // Eval mode normalizes with the running statistics.
  ref->eval();
  const auto y_eval = std::get<0>(masknorm::batch_norm(
      x, std::nullopt, w, b, running_mean, running_var, std::nullopt, /*training=*/false, 0.1, 1e-5, false));
  expect_close(y_eval, ref->forward(x), "batch_norm eval output");
}

// The stages compose to batch_norm from C++ too: stats -> merge_stats (two
// parts, one of them empty) -> elemt, and backward_reduce -> backward_elemt.
void batch_norm_stages_compose() {
  const int64_t N = 4, L = 7, C = 5;
  const auto mask = padding_mask({7, 3, 0, 5}, L);
  const auto x = torch::randn({N, L, C}, torch::kDouble) * 2 + 3;
  const auto w = torch::rand({C}, torch::kDouble) + 0.5, b = torch::randn({C}, torch::kDouble);
  auto [y_ref, save_mean, save_invstd] = masknorm::batch_norm(
      x, mask, w, b, std::nullopt, std::nullopt, std::nullopt, true, 0.1, 1e-5, /*channels_last=*/true);
  auto [mean, m2, count] = masknorm::batch_norm_stats(x, mask, true);
  const auto nan = torch::full({1, C}, NAN, torch::kDouble);
  auto [mu, invstd, n] = masknorm::batch_norm_merge_stats(
      torch::cat({mean.unsqueeze(0), nan}), torch::cat({m2.unsqueeze(0), nan}),
      torch::stack({count, torch::zeros_like(count)}), std::nullopt, std::nullopt, std::nullopt, 0.1, 1e-5);
  expect(n.item<int64_t>() == 15, "merge_stats counts the valid positions of both parts");
  expect_close(masknorm::batch_norm_elemt(x, mask, w, b, mu, invstd, true), y_ref, "stats -> merge -> elemt");
  const auto dy = torch::randn_like(x);
  auto [dx_ref, dw_ref, db_ref] = masknorm::batch_norm_backward(
      dy, x, mask, w, save_mean, save_invstd, true, true, {true, true, true});
  auto [sum_dy, sum_dy_xhat] = masknorm::batch_norm_backward_reduce(dy, x, mask, mu, invstd, true);
  expect_close(sum_dy_xhat, dw_ref, "backward_reduce: grad_weight");
  expect_close(sum_dy, db_ref, "backward_reduce: grad_bias");
  expect_close(
      masknorm::batch_norm_backward_elemt(dy, x, mask, w, mu, invstd, sum_dy, sum_dy_xhat, n, true), dx_ref,
      "backward_reduce -> backward_elemt");
}

// Masked (N, L, C) batch norm = torch's BatchNorm1d on the packed valid tokens.
void masked_batch_norm_matches_packed_torch() {
  const int64_t N = 3, L = 6, C = 4;
  const auto mask = padding_mask({6, 2, 4}, L);
  const auto valid = mask.logical_not();
  torch::nn::BatchNorm1d ref{torch::nn::BatchNorm1dOptions(C).affine(false)};
  ref->to(torch::kDouble);
  // NaN in the padding must not reach anything.
  const auto x = (torch::randn({N, L, C}, torch::kDouble) + 5).masked_fill(mask.unsqueeze(-1), NAN);
  const auto x_ref = x.clone().requires_grad_(), x_ours = x.clone().requires_grad_();

  const auto y_ref = ref->forward(x_ref.index({valid}));
  const auto y = std::get<0>(masknorm::batch_norm(
      x_ours, mask, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true, 0.1, 1e-5,
      /*channels_last=*/true));
  expect_close(y.index({valid}), y_ref, "masked batch_norm output (valid tokens)");
  expect(y.index({mask}).eq(0).all().item<bool>(), "masked batch_norm output is 0 at padding");

  const auto grad = torch::randn_like(y);
  y.backward(grad);
  y_ref.backward(grad.index({valid}));
  expect_close(x_ours.grad().index({valid}), x_ref.grad().index({valid}), "masked batch_norm grad_input");
  expect(x_ours.grad().index({mask}).eq(0).all().item<bool>(), "masked batch_norm grad_input is 0 at padding");
}

// Masked layer norm / RMS norm: torch's result on valid rows, 0 on padded rows.
void masked_row_norms_match_torch() {
  const int64_t N = 3, L = 5, C = 8;
  const auto mask = padding_mask({5, 1, 3}, L);
  const auto valid = mask.logical_not().unsqueeze(-1);
  const auto x = torch::randn({N, L, C}, torch::kDouble) * 2 + 1;
  const auto grad = torch::randn({N, L, C}, torch::kDouble);

  torch::nn::LayerNorm ln{torch::nn::LayerNormOptions({C})};
  ln->to(torch::kDouble);
  const auto w = param(C, 0.5, 1.5), b = param(C, -1, 1), w_rms = param(C, 0.5, 1.5);
  {
    torch::NoGradGuard no_grad;
    ln->weight.copy_(w);
    ln->bias.copy_(b);
  }
  const auto x_ref = x.clone().requires_grad_(), x_ours = x.clone().requires_grad_();
  const auto y_ref = ln->forward(x_ref).masked_fill(valid.logical_not(), 0);
  const auto y = std::get<0>(masknorm::layer_norm(x_ours, {C}, mask, w, b, 1e-5));
  expect_close(y, y_ref, "masked layer_norm output");
  y.backward(grad);
  y_ref.backward(grad);
  expect_close(x_ours.grad(), x_ref.grad(), "masked layer_norm grad_input");
  expect_close(w.grad(), ln->weight.grad(), "masked layer_norm grad_weight");
  expect_close(b.grad(), ln->bias.grad(), "masked layer_norm grad_bias");

  const auto w_ref = w_rms.detach().clone().requires_grad_();
  const auto x_rms_ref = x.clone().requires_grad_(), x_rms = x.clone().requires_grad_();
  const auto r_ref = at::rms_norm(x_rms_ref, {C}, w_ref, 1e-6).masked_fill(valid.logical_not(), 0);
  const auto r = std::get<0>(masknorm::rms_norm(x_rms, {C}, mask, w_rms, 1e-6));
  expect_close(r, r_ref, "masked rms_norm output");
  r.backward(grad);
  r_ref.backward(grad);
  expect_close(x_rms.grad(), x_rms_ref.grad(), "masked rms_norm grad_input");
  expect_close(w_rms.grad(), w_ref.grad(), "masked rms_norm grad_weight");
}

// Double backward through C++ autograd: the gradient of a gradient penalty
// ||d<y, g>/d(x, w)||^2 matches torch's norms (which support double backward).
void double_backward_matches_torch() {
  const int64_t N = 4, L = 5, C = 6;
  const auto x = torch::randn({N, L, C}, torch::kDouble) * 2 + 1;
  const auto g = torch::randn({N, L, C}, torch::kDouble);
  const auto w = torch::empty({C}, torch::kDouble).uniform_(0.5, 1.5);
  const auto b = torch::randn({C}, torch::kDouble);
  using Norm = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;
  const std::vector<std::tuple<std::string, Norm, Norm>> cases = {
      {"batch_norm",
       [&](const at::Tensor& x, const at::Tensor& w) {
         return std::get<0>(masknorm::batch_norm(
             x, std::nullopt, w, b, std::nullopt, std::nullopt, std::nullopt, true, 0.1, 1e-5, true));
       },
       [&](const at::Tensor& x, const at::Tensor& w) {
         return at::batch_norm(x.transpose(1, 2), w, b, {}, {}, true, 0.1, 1e-5, false).transpose(1, 2);
       }},
      {"layer_norm",
       [&](const at::Tensor& x, const at::Tensor& w) {
         return std::get<0>(masknorm::layer_norm(x, {C}, std::nullopt, w, b, 1e-5));
       },
       [&](const at::Tensor& x, const at::Tensor& w) { return at::layer_norm(x, {C}, w, b, 1e-5); }},
      {"rms_norm",
       [&](const at::Tensor& x, const at::Tensor& w) {
         return std::get<0>(masknorm::rms_norm(x, {C}, std::nullopt, w, 1e-6));
       },
       [&](const at::Tensor& x, const at::Tensor& w) { return at::rms_norm(x, {C}, w, 1e-6); }},
  };
  for (const auto& [name, ours, ref] : cases) {
    std::vector<at::Tensor> second;  // d penalty / dx, d penalty / dw: ours, then torch's
    for (const Norm& norm : {ours, ref}) {
      const auto xi = x.clone().requires_grad_(), wi = w.clone().requires_grad_();
      const auto first = torch::autograd::grad(
          {(norm(xi, wi) * g).sum()}, {xi, wi}, {}, /*retain_graph=*/true, /*create_graph=*/true);
      const auto penalty = first[0].pow(2).sum() + first[1].pow(2).sum();
      const auto d = torch::autograd::grad({penalty}, {xi, wi});
      second.insert(second.end(), d.begin(), d.end());
    }
    expect_close(second[0], second[2], name + " double backward, input");
    expect_close(second[1], second[3], name + " double backward, weight");
  }
}

// Bad input raises a c10::Error naming the argument, as from Python.
void bad_input_raises() {
  const auto x = torch::randn({2, 3, 4});
  const auto wrong_mask = torch::zeros({2, 5}, torch::kBool);
  try {
    masknorm::layer_norm(x, {4}, wrong_mask, std::nullopt, std::nullopt, 1e-5);
    expect(false, "layer_norm with a (2, 5) mask for a (2, 3, 4) input should raise");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find("padding_mask") != std::string::npos, "error names padding_mask");
  }
}

void kernel_build_is_the_best_one() {
  const std::string isa = masknorm::cpu_kernels_isa();
  std::cout << "CPU kernels: " << isa << " (torch CPU capability " << at::get_cpu_capability() << ")\n";
#ifdef MASKNORM_TEST_ISA_BUILDS
  std::string expected = at::get_cpu_capability();
  for (char& c : expected) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  expect(isa == expected, "kernel build for this CPU is " + expected + ", not " + isa);
#else
  expect(isa == "default", "portable kernels when no instruction-set build exists");
#endif
}

}  // namespace

int main() {
  torch::manual_seed(0);
  batch_norm_matches_torch();
  masked_batch_norm_matches_packed_torch();
  batch_norm_stages_compose();
  masked_row_norms_match_torch();
  double_backward_matches_torch();
  bad_input_raises();
  kernel_build_is_the_best_one();
  expect(!python_in_process(), "no Python library in the process");
  if (failures > 0) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all masknorm C++ checks passed\n";
  return 0;
}
