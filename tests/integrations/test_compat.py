"""A torchvision built for another torch imports after `import fastprompt`, whoever imports it; no other import
error is hidden; `import fastprompt` itself imports neither torch nor torchvision."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fastprompt._compat import WARNING_ENV


def run_python(code: str, path: str | None = None, *, warn: bool = True) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; `warn` asks for the mismatch warning (silent by default, see _compat)."""
    env_path = f"import sys; sys.path.insert(0, {path!r});" if path else ""
    env = {k: v for k, v in os.environ.items() if k != WARNING_ENV}
    if warn:
        env[WARNING_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", env_path + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
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


def test_mismatch_repair_is_silent_by_default_and_logged_at_debug():
    plain = run_python("import torchvision")
    if "torchvision::nms does not exist" not in plain.stderr:
        pytest.skip("this environment's torchvision matches its torch; nothing to repair")
    quiet = run_python("import fastprompt, timm; print('ok')", warn=False)
    assert quiet.returncode == 0 and "ok" in quiet.stdout, quiet.stderr
    assert "torchvision" not in quiet.stderr  # nothing printed, by default
    code = "import logging; logging.basicConfig(level=logging.DEBUG); import fastprompt, timm"
    debug = run_python(code, warn=False)
    assert "built for another torch" in debug.stderr and "TorchvisionMismatchWarning" not in debug.stderr


# A torchvision whose import fails like the CUDA wheel on CPU torch until the two schemas exist: a submodule is
# imported first (the partial import the repair must forget), then the op check fails.
MISMATCHED = """
import torch
from torchvision import _partial
_partial.loads += 1
torch.library.register_fake("torchvision::nms")(lambda dets, scores, iou_threshold: dets.new_empty(0))
__version__ = "0.0-fake"
"""


def test_repair_runs_when_a_third_party_imports_torchvision_later(tmp_path):
    path = fake_torchvision(tmp_path, MISMATCHED)
    (tmp_path / "torchvision" / "_partial.py").write_text("loads = 0\n")
    (tmp_path / "thirdparty.py").write_text("import torchvision\n")
    code = """
    import sys
    import fastprompt
    assert "torchvision" not in sys.modules and "torch" not in sys.modules
    import thirdparty, torchvision, torchvision
    print(torchvision.__version__, torchvision._partial.loads)
    """
    result = run_python(code, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.0-fake", "1"]  # the partial submodule was imported afresh, once
    assert result.stderr.count("TorchvisionMismatchWarning") == 1


def test_without_fastprompt_the_fake_mismatch_fails(tmp_path):  # the fake above reproduces the real failure
    path = fake_torchvision(tmp_path, MISMATCHED)
    (tmp_path / "torchvision" / "_partial.py").write_text("loads = 0\n")
    result = run_python("import torchvision", path)
    assert result.returncode != 0 and "operator torchvision::nms does not exist" in result.stderr


def test_other_import_errors_are_not_hidden(tmp_path):
    path = fake_torchvision(tmp_path, "raise RuntimeError('libfoo.so: cannot open shared object file')")
    result = run_python("import fastprompt, torchvision", path)
    assert result.returncode != 0
    assert "libfoo.so" in result.stderr
    assert "TorchvisionMismatchWarning" not in result.stderr


def test_missing_dependency_is_not_hidden(tmp_path):
    path = fake_torchvision(tmp_path, "import a_module_that_does_not_exist")
    result = run_python("import fastprompt, torchvision", path)
    assert result.returncode != 0
    assert "a_module_that_does_not_exist" in result.stderr


def test_public_api():
    import fastprompt

    assert sorted(fastprompt.__all__) == sorted([*fastprompt._EXPORTS, "__version__"])  # one table, no strays
    for name in fastprompt._EXPORTS:
        assert callable(getattr(fastprompt, name)), name
    assert set(fastprompt._EXPORTS) <= set(dir(fastprompt))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        fastprompt.no_such_name  # noqa: B018
