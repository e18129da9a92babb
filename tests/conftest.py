"""Fixtures and hooks of the masknorm test suite (helpers that test modules
import are in ``helpers.py``; sample inputs per op in ``tests/samples/``).

Parametrizations:

* ``kernels``: a test module marked ``pytestmark = pytest.mark.kernels`` (or a
  test marked so) runs once with the native kernels (the CPU build chosen for
  this processor, CUDA kernels on CUDA tensors) and once with the generic
  kernels written with ATen ops (``masknorm._C._force_generic_kernels``),
  which the fixture always switches off again. Other tests run the native
  kernels.
* ``device``: tests taking it run on the CPU, and on CUDA when
  ``torch.cuda.is_available()`` (skipped, with the reason, otherwise).

Markers: ``slow`` marks the modules that spawn processes, compile or draw
hundreds of random cases, and the generic-kernel runs of the ``kernels``
tests; ``python -m pytest tests -m "not slow"`` is the quick loop (every op
and public name on the native kernels), ``python -m pytest tests`` runs all.
"""

import pytest
import torch

import masknorm  # noqa: F401  (a failing import must fail the whole suite)
from helpers import DEVICES, KERNELS


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "kernels: run once with the native kernels and once with the generic (ATen-op) kernels"
    )


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("kernels") is not None:
        # the generic kernels are the reference: the full suite runs them, the quick loop does not
        params = [pytest.param(k, marks=pytest.mark.slow) if k == "generic" else k for k in KERNELS]
        metafunc.parametrize("kernels", params, indirect=True)


@pytest.fixture(autouse=True)
def kernels(request):
    """The kernel set a test runs ("native" unless parametrized): forced
    generic kernels are switched off again whatever the test does."""
    name = getattr(request, "param", "native")
    masknorm._C._force_generic_kernels(name == "generic")
    try:
        assert (masknorm._C._kernels_for("cpu") == "generic") == (name == "generic")
        yield name
    finally:
        masknorm._C._force_generic_kernels(False)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state (reproducible failures)."""
    torch.manual_seed(0)
    yield 0
