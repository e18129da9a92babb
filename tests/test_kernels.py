"""Which kernels serve each device (masknorm.kernels_for) and the switches
(use_fused_cuda_kernels, enable_device_data_checks; the test-only
masknorm._C._force_generic_kernels)."""
import pytest
import torch

import masknorm

ops = torch.ops.masknorm


def test_cpu_tensors_get_the_cpu_build():
    assert masknorm.kernels_for("cpu") == masknorm.build_info()["cpu_kernels"]


def test_other_devices_get_the_generic_kernels():
    assert masknorm.kernels_for("meta") == "generic"
    assert masknorm.kernels_for(torch.device("xpu")) == "generic"


def test_cuda_tensors_get_the_fused_kernels_where_built_and_on():
    built = masknorm.build_info()["cuda"]
    try:
        masknorm.use_fused_cuda_kernels(True)
        assert masknorm.kernels_for("cuda") == ("cuda" if built else "generic")
        masknorm.use_fused_cuda_kernels(False)
        assert masknorm.kernels_for("cuda") == "generic"
    finally:
        masknorm.use_fused_cuda_kernels(True)


def test_forced_generic_kernels_serve_the_cpu_too():
    try:
        masknorm._C._force_generic_kernels(True)
        assert masknorm.kernels_for("cpu") == "generic"
    finally:
        masknorm._C._force_generic_kernels(False)
    assert masknorm.kernels_for("cpu") != "generic"


def test_data_checks_always_run_on_the_cpu():
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    masknorm.enable_device_data_checks(False)  # accelerators only: the CPU checks regardless
    with pytest.raises(ValueError, match="more than 1 valid"):
        ops.batch_norm(x, mask, None, None, None, None, None, True, 0.1, 1e-5, True)
