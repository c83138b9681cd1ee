"""`import fastprompt` survives a torchvision built for another torch, and hides no other import error."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, path: str | None = None) -> subprocess.CompletedProcess:
    env_path = f"import sys; sys.path.insert(0, {path!r});" if path else ""
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", env_path + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def fake_torchvision(tmp_path, source: str) -> str:
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(source)
    return str(tmp_path)


def test_mismatched_torchvision_imports_with_one_warning():
    plain = run_python("import torchvision")
    if "torchvision::nms does not exist" not in plain.stderr:
        pytest.skip("this environment's torchvision matches its torch; nothing to repair")
    code = "import fastprompt, fastprompt, timm, torchvision; timm.create_model('vit_tiny_patch16_224'); print('ok')"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert result.stderr.count("TorchvisionMismatchWarning") == 1
    assert "install the torchvision that matches your torch" in result.stderr


def test_other_import_errors_are_not_hidden(tmp_path):
    path = fake_torchvision(tmp_path, "raise RuntimeError('libfoo.so: cannot open shared object file')")
    result = run_python("import fastprompt", path)
    assert result.returncode != 0
    assert "libfoo.so" in result.stderr
    assert "TorchvisionMismatchWarning" not in result.stderr


def test_missing_dependency_is_not_hidden(tmp_path):
    path = fake_torchvision(tmp_path, "import a_module_that_does_not_exist")
    result = run_python("import fastprompt", path)
    assert result.returncode != 0
    assert "a_module_that_does_not_exist" in result.stderr


@pytest.mark.parametrize("name", ["apply", "count_parameters", "merge", "available_methods"])
def test_public_api(name):
    import fastprompt

    assert callable(getattr(fastprompt, name))
