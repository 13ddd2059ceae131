"""The sdist carries everything its own build needs (csrc/, py.typed, the tests), and a wheel
built from it records why it has no CUDA kernel. Built with setuptools' PEP 517 backend in a
copy of the tree (TORCH_MLA_NO_CUDA=1: no compiler runs), so nothing is written into the tree."""

import email
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import torch_mla

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="the tests run outside a source tree")
IGNORE = shutil.ignore_patterns(".git", ".venv", ".whl", "build", "dist", "gpu-out", "*.egg-info", "__pycache__",
                                ".hypothesis", ".pytest_cache", "*.so", "_cuda_build_skipped.txt")


def build(kind: str, project: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    code = f"import setuptools.build_meta as b; print(b.build_{kind}({str(out)!r}))"
    env = dict(os.environ, TORCH_MLA_NO_CUDA="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    tree = tmp_path_factory.mktemp("tree") / "torch-mla"
    shutil.copytree(ROOT, tree, ignore=IGNORE)
    return build("sdist", tree, tmp_path_factory.mktemp("dist"))


def test_sdist_holds_every_kernel_source_the_tests_and_py_typed(sdist):
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
        info = email.message_from_bytes(tar.extractfile(f"{top}/PKG-INFO").read())
    kernel = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert kernel and kernel <= names, sorted(kernel - names)
    assert {"setup.py", "pyproject.toml", "torch_mla/py.typed", "tests/conftest.py", "tests/oracle.py",
            "tools/gpu_check.sh"} <= names
    assert "torch_mla/_cuda_build_skipped.txt" not in names
    assert info["Version"] == torch_mla.__version__


def test_wheel_built_from_the_sdist_says_why_it_has_no_kernel(sdist, tmp_path):
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    project = next(p for p in tmp_path.iterdir() if p.is_dir())
    wheel = build("wheel", project, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        skipped = whl.read("torch_mla/_cuda_build_skipped.txt").decode()
        meta = email.message_from_bytes(whl.read(f"torch_mla-{torch_mla.__version__}.dist-info/METADATA"))
    assert {"torch_mla/py.typed", "torch_mla/flash_mla.py"} <= names
    assert skipped.strip() == "TORCH_MLA_NO_CUDA was set"
    requires = meta.get_all("Requires-Dist")
    assert 'transformers==5.23.0; extra == "hf"' in requires and 'torch-mla[hf]; extra == "test"' in requires
