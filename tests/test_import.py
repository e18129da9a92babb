"""The package imports on its own (without importing torch first)."""

import subprocess
import sys


def test_import_masknorm_standalone():
    code = "import masknorm, torch; assert hasattr(torch.ops.masknorm, 'batch_norm'); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok" in proc.stdout


def test_build_info_and_version():
    import masknorm

    info = masknorm.build_info()
    assert info == masknorm._C.build_info()
    assert info["version"] == masknorm.__version__
    assert info["torch_version"] == __import__("torch").__version__
