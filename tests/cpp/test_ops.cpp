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

// Masked group norm (and instance norm, one group per channel) against
// torch::nn::GroupNorm on every sample cropped to its length: outputs, input
// and parameter gradients; instance norm's running statistics.
void masked_group_norm_matches_torch() {
  const int64_t N = 3, C = 6, L = 7, G = 3;
  const std::vector<int64_t> lengths{7, 2, 4};
  const auto mask = padding_mask(lengths, L);
  const auto x = torch::randn({N, C, L}, torch::kDouble) * 2 + 1;
  const auto grad = torch::randn({N, C, L}, torch::kDouble);
  const auto w = param(C, 0.5, 1.5), b = param(C, -1, 1);
  const auto x_ours = x.clone().requires_grad_();
  const auto y = std::get<0>(masknorm::group_norm(x_ours, mask, w, b, G, 1e-5, /*channels_last=*/false));
  y.backward(grad);
  torch::nn::GroupNorm gn{torch::nn::GroupNormOptions(G, C)};
  gn->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    gn->weight.copy_(w);
    gn->bias.copy_(b);
  }
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = lengths[n];
    const auto xn = x.slice(0, n, n + 1).slice(2, 0, k).clone().requires_grad_();
    const auto yn = gn->forward(xn);
    yn.backward(grad.slice(0, n, n + 1).slice(2, 0, k));
    const auto name = "masked group_norm sample " + std::to_string(n);
    expect_close(y.slice(0, n, n + 1).slice(2, 0, k), yn, name + " output");
    expect_close(x_ours.grad().slice(0, n, n + 1).slice(2, 0, k), xn.grad(), name + " grad_input");
    expect(y.slice(0, n, n + 1).slice(2, k).eq(0).all().item<bool>(), name + " zeros at padding");
  }
  expect_close(w.grad(), gn->weight.grad(), "masked group_norm grad_weight");
  expect_close(b.grad(), gn->bias.grad(), "masked group_norm grad_bias");

  auto running_mean = torch::zeros({C}, torch::kDouble), running_var = torch::ones({C}, torch::kDouble);
  masknorm::instance_norm(x, mask, std::nullopt, std::nullopt, running_mean, running_var, 0.1, 1e-5, false);
  std::vector<at::Tensor> means, vars;
  for (int64_t n = 0; n < N; ++n) {
    const auto xn = x[n].slice(1, 0, lengths[n]);
    means.push_back(xn.mean(1));
    vars.push_back(xn.var(1));
  }
  expect_close(running_mean, 0.1 * torch::stack(means).mean(0), "instance_norm running_mean");
  expect_close(running_var, 0.9 + 0.1 * torch::stack(vars).mean(0), "instance_norm running_var");
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

// Every op over odd shapes (vector tails: C and widths around 8 and 16, and
// primes), empty ones, masks with padded rows and nothing valid, four dtypes,
// training and eval, 1 to 4 threads, each compared with torch on the valid
// positions. Its point is to run the kernels' loops where an out-of-bounds
// access or undefined behaviour would be (built with -DMASKNORM_SANITIZE=ON,
// AddressSanitizer and UndefinedBehaviorSanitizer abort on the first one).
at::Tensor random_mask(int64_t N, int64_t L, int which) {
  if (which == 0) return torch::zeros({N, L}, torch::kBool);
  if (which == 1) return torch::ones({N, L}, torch::kBool);
  auto mask = torch::rand({N, L}) < 0.4;
  if (N > 1) mask[1].fill_(true);  // a fully padded row
  if (which == 3) return (mask.to(torch::kByte) * 255).view(torch::kBool);  // bytes 255 where True
  return mask;
}

void expect_close_to(const at::Tensor& actual, const at::Tensor& expected, double tol, const std::string& what) {
  const bool ok = actual.sizes() == expected.sizes() &&
      (actual.numel() == 0 || at::allclose(actual.to(torch::kDouble), expected.to(torch::kDouble), tol, tol));
  if (!ok) std::cerr << what << ": sizes " << actual.sizes() << " / " << expected.sizes() << "\n";
  expect(ok, what);
}

void shapes_workout() {
  const std::vector<at::ScalarType> dtypes = {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf};
  int calls = 0;
  for (const int threads : {1, 3}) {
    at::set_num_threads(threads);
    for (const auto dtype : dtypes) {
      const double tol = dtype == torch::kDouble ? 1e-9 : dtype == torch::kFloat ? 1e-4 : 3e-2;
      for (const int64_t C : {1, 7, 8, 9, 15, 16, 17, 33}) {
        for (const auto& [N, L] : std::vector<std::pair<int64_t, int64_t>>{{0, 3}, {1, 1}, {3, 5}, {2, 70}, {5, 0}}) {
          for (int which = 0; which < 4; ++which) {
            const auto mask = random_mask(N, L, which);
            const auto valid = mask.logical_not();
            const int64_t count = valid.sum().item<int64_t>();
            for (const bool channels_last : {true, false}) {
              // (N, L, C) data; channels-first input is its transpose, made contiguous
              const auto data = torch::randn({N, L, C}, torch::kDouble) * 2 + 1;
              const auto x = (channels_last ? data : data.transpose(1, 2).contiguous()).to(dtype);
              const auto g = torch::randn_like(x);
              const auto w = torch::rand({C}).add(0.5).to(dtype), b = torch::randn({C}).to(dtype);
              for (const bool training : {true, false}) {
                if (training && count == 1) continue;  // raises, as torch's
                auto rm = torch::zeros({C}, dtype), rv = torch::ones({C}, dtype);
                const auto nbt = torch::zeros({}, torch::kLong);
                auto [y, mean, invstd] = masknorm::batch_norm(
                    x, mask, w, b, rm, rv, nbt, training, 0.1, 1e-5, channels_last);
                auto [dx, dw, db] = masknorm::batch_norm_backward(
                    g, x, mask, w, mean, invstd, training, channels_last, {true, true, true});
                ++calls;
                // torch on the packed valid tokens (K, C)
                const auto rows = channels_last ? x : x.transpose(1, 2);
                const auto packed = rows.index({valid}).to(torch::kDouble);
                if (count >= 2 || !training) {
                  auto rm_ref = torch::zeros({C}, torch::kDouble), rv_ref = torch::ones({C}, torch::kDouble);
                  const auto y_ref = at::batch_norm(packed, w.to(torch::kDouble), b.to(torch::kDouble), rm_ref,
                                                    rv_ref, training, 0.1, 1e-5, false);
                  const auto y_rows = channels_last ? y : y.transpose(1, 2);
                  expect_close_to(y_rows.index({valid}), y_ref, tol, "batch_norm output");
                  if (training) expect_close_to(rm, rm_ref, tol, "batch_norm running_mean");
                }
                expect(!mask.any().item<bool>() ||
                           (channels_last ? y.index({mask}) : y.transpose(1, 2).index({mask})).eq(0).all().item<bool>(),
                       "batch_norm output 0 at padding");
                expect(dx.sizes() == x.sizes() && dw.sizes() == w.sizes() && db.sizes() == w.sizes(),
                       "batch_norm_backward shapes");
              }
              // the stages
              auto [mean, m2, cnt] = masknorm::batch_norm_stats(x, mask, channels_last);
              expect(cnt.item<int64_t>() == count, "batch_norm_stats count");
              auto [mu, invstd, total] = masknorm::batch_norm_merge_stats(
                  torch::stack({mean, mean}), torch::stack({m2, m2}), torch::stack({cnt, cnt}), std::nullopt,
                  std::nullopt, std::nullopt, 0.1, 1e-5);
              const auto y = masknorm::batch_norm_elemt(x, mask, w, b, mu, invstd, channels_last);
              auto [sum_dy, sum_dy_xhat] = masknorm::batch_norm_backward_reduce(g, x, mask, mu, invstd, channels_last);
              const auto dx = masknorm::batch_norm_backward_elemt(
                  g, x, mask, w, mu, invstd, sum_dy, sum_dy_xhat, total, channels_last);
              expect(y.sizes() == x.sizes() && dx.sizes() == x.sizes(), "stage shapes");
              calls += 5;
            }
            // layer / RMS norm over rows of C (C is the width here)
            const auto x = (torch::randn({N, L, C}, torch::kDouble) * 3 - 1).to(dtype);
            const auto g = torch::randn_like(x);
            const auto w = torch::rand({C}).add(0.5).to(dtype), b = torch::randn({C}).to(dtype);
            auto [y, mean, rstd] = masknorm::layer_norm(x, {C}, mask, w, b, 1e-5);
            auto [dx, dw, db] = masknorm::layer_norm_backward(g, x, {C}, mask, mean, rstd, w, {true, true, true});
            auto [r, rrstd] = masknorm::rms_norm(x, {C}, mask, w, std::nullopt);
            auto [rdx, rdw] = masknorm::rms_norm_backward(g, x, {C}, mask, rrstd, w, {true, true});
            calls += 4;
            const auto rows = x.index({valid}).to(torch::kDouble);
            if (C > 2) {  // LN of one or two values: all cancellation
              expect_close_to(y.index({valid}),
                              at::layer_norm(rows, {C}, w.to(torch::kDouble), b.to(torch::kDouble), 1e-5), tol,
                              "layer_norm output");
            }
            expect_close_to(r.index({valid}), at::rms_norm(rows, {C}, w.to(torch::kDouble),
                                                           dtype == torch::kDouble ? 2.220446049250313e-16
                                                                                   : 1.1920928955078125e-07),
                            tol, "rms_norm output");
            expect(dx.sizes() == x.sizes() && rdx.sizes() == x.sizes() && dw.sizes() == w.sizes() &&
                       rdw.sizes() == w.sizes(), "row norm backward shapes");
          }
        }
      }
    }
  }
  at::set_num_threads(1);
  std::cout << "shapes workout: " << calls << " op calls\n";
}

// Malformed arguments from C++: each raises a c10::Error, none crashes.
void malformed_arguments_raise() {
  const auto x = torch::randn({3, 4, 5});
  const auto mask = torch::zeros({3, 5}, torch::kBool);
  const auto w = torch::ones({4});
  const std::vector<std::pair<std::string, std::function<void()>>> calls = {
      {"eps NaN", [&] { masknorm::batch_norm(x, mask, w, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true,
                                             0.1, NAN, false); }},
      {"weight too long", [&] { masknorm::batch_norm(x, mask, torch::ones({5}), std::nullopt, std::nullopt,
                                                     std::nullopt, std::nullopt, true, 0.1, 1e-5, false); }},
      {"mask of uint8", [&] { masknorm::batch_norm_stats(x, mask.to(torch::kByte), false); }},
      {"expanded running_mean", [&] {
         masknorm::batch_norm(x, mask, w, std::nullopt, torch::zeros({1}).expand({4}), torch::ones({4}),
                              std::nullopt, true, 0.1, 1e-5, false); }},
      {"negative count", [&] {
         auto [mean, m2, count] = masknorm::batch_norm_stats(x, mask, false);
         masknorm::batch_norm_merge_stats(mean.unsqueeze(0), m2.unsqueeze(0), torch::full({1}, -3, torch::kLong),
                                          std::nullopt, std::nullopt, std::nullopt, 0.1, 1e-5); }},
      {"fractional count", [&] {
         auto [mean, m2, count] = masknorm::batch_norm_stats(x, mask, false);
         masknorm::batch_norm_merge_stats(mean.unsqueeze(0), m2.unsqueeze(0), torch::full({1}, 2.5),
                                          std::nullopt, std::nullopt, std::nullopt, 0.1, 1e-5); }},
      {"undefined save_mean", [&] {
         masknorm::batch_norm_backward(x, x, mask, w, at::Tensor(), torch::ones({4}), true, false,
                                       {true, true, true}); }},
      {"empty normalized_shape", [&] { masknorm::layer_norm(x, {}, std::nullopt, std::nullopt, std::nullopt, 1e-5); }},
      {"negative eps", [&] { masknorm::rms_norm(x, {5}, std::nullopt, std::nullopt, -1.0); }},
      {"rstd of another shape", [&] {
         masknorm::rms_norm_backward(x, x, {5}, std::nullopt, torch::ones({3}), std::nullopt, {true, true}); }},
  };
  for (const auto& [what, call] : calls) {
    try {
      call();
      expect(false, what + ": accepted");
    } catch (const c10::Error&) {
    }
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
  masked_group_norm_matches_torch();
  double_backward_matches_torch();
  bad_input_raises();
  shapes_workout();
  malformed_arguments_raise();
  kernel_build_is_the_best_one();
  expect(!python_in_process(), "no Python library in the process");
  if (failures > 0) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all masknorm C++ checks passed\n";
  return 0;
}
