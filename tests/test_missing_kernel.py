"""Where CUDA is present but the compiled kernel is not, CUDA calls run the reference: the first
one warns, saying why and how to build it, and TORCH_MLA_REQUIRE_CUDA_KERNEL=1 makes every one an
error. Simulated on the CPU: the impls registered for the CUDA key are Python (torch_mla's
_CUDA_FALLBACKS), called here with CPU tensors, with the extension's absence patched in."""

import warnings

import pytest
import torch

import torch_mla
from torch_mla.testing import paged_inputs

REASON = "the build skipped it: the CUTLASS headers were not found"


@pytest.fixture
def kernel_missing(monkeypatch):
    monkeypatch.setattr(torch_mla, "_CUDA_KERNEL_ERROR", REASON)
    monkeypatch.setattr(torch_mla, "_warned", False)
    monkeypatch.delenv("TORCH_MLA_REQUIRE_CUDA_KERNEL", raising=False)
    return torch_mla._CUDA_FALLBACKS


def decode_args():
    q, kv, bt, lens = paged_inputs([70, 3], h_q=4, dtype=torch.float32)
    return q, kv, bt, lens, 512, None, False, None, None


def test_first_call_without_the_kernel_warns_why_and_how_to_build(kernel_missing):
    with pytest.warns(RuntimeWarning) as caught:
        out, lse = kernel_missing["decode"](*decode_args())
    message = str(caught[0].message)
    assert REASON in message and "100x slower" in message
    assert "pip install --no-build-isolation" in message and "TORCH_MLA_REQUIRE_CUDA_KERNEL=1" in message
    expected = torch_mla.decode(*decode_args()[:4])
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def test_later_calls_without_the_kernel_do_not_warn_again(kernel_missing):
    with pytest.warns(RuntimeWarning):
        kernel_missing["get_metadata"](torch.tensor([5], dtype=torch.int32), 16, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel_missing["decode"](*decode_args())
        kernel_missing["get_metadata"](torch.tensor([5], dtype=torch.int32), 16, 1)


@pytest.mark.parametrize("op", ["decode", "get_metadata", "write_cache"])
def test_required_kernel_makes_every_fallback_call_an_error(kernel_missing, monkeypatch, op):
    monkeypatch.setenv("TORCH_MLA_REQUIRE_CUDA_KERNEL", "1")
    kv = torch.zeros(2, 64, 1, 576)
    args = {
        "decode": decode_args(),
        "get_metadata": (torch.tensor([5], dtype=torch.int32), 16, 1),
        "write_cache": (torch.zeros(1, 512), torch.zeros(1, 64), kv, torch.tensor([3])),
    }[op]
    for _ in range(2):
        with pytest.raises(RuntimeError, match=f"CUDA kernel is not loaded \\({REASON}\\).*TORCH_MLA_REQUIRE_CUDA_KERNEL"):
            kernel_missing[op](*args)
    assert not kv.any()


def test_the_build_skip_reason_is_what_cuda_kernel_error_reports(tmp_path, monkeypatch):
    skip_file = tmp_path / "_cuda_build_skipped.txt"
    skip_file.write_text("torch 2.13.0+cpu is a CPU-only build\n")
    monkeypatch.setattr(torch_mla, "_SKIP_FILE", str(skip_file))

    def no_extension(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(torch_mla.importlib, "import_module", no_extension)
    assert torch_mla._load_extension() == "the build skipped it: torch 2.13.0+cpu is a CPU-only build"
    skip_file.unlink()
    assert torch_mla._load_extension() == "importing torch_mla._C failed: No module named 'torch_mla._C'"


def test_an_extension_that_fails_to_load_reports_its_import_error(monkeypatch, tmp_path):
    (tmp_path / "_cuda_build_skipped.txt").write_text("stale\n")
    monkeypatch.setattr(torch_mla, "_SKIP_FILE", str(tmp_path / "_cuda_build_skipped.txt"))

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(torch_mla.importlib, "import_module", broken)
    assert torch_mla._load_extension() == "importing torch_mla._C failed: undefined symbol: _ZN3c10"
