#include <masknorm/ops.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto x = torch::randn({8, 128, 512}, torch::requires_grad());
  auto mask = torch::arange(128).unsqueeze(0) >= torch::randint(1, 129, {8, 1});  // True = padding
  auto weight = torch::ones({512}, torch::requires_grad());
  auto bias = torch::zeros({512}, torch::requires_grad());
  auto [y, mean, rstd] = masknorm::layer_norm(x, {512}, mask, weight, bias, 1e-5);
  y.sum().backward();  // x.grad(), weight.grad(), bias.grad()

  bool padding_is_zero = (y.masked_select(mask.unsqueeze(-1)) == 0).all().item<bool>();
  std::cout << "masknorm layer_norm on " << masknorm::cpu_kernels_isa() << " CPU kernels; padded outputs are 0: "
            << std::boolalpha << padding_is_zero << "\n";
  return padding_is_zero ? 0 : 1;
}
