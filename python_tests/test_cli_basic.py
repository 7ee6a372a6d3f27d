"""tandem-rt info / inspect, and the one-line error convention."""
import json
import subprocess
import sys

from tandem_rt.checkpoint import save_checkpoint
from tandem_rt.cli import main
from conftest import random_tandem_model


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tandem_rt"]["torch_version"] == info["torch"]
    assert "cpu" in info["devices"]
    from tandem_rt.quantized import packs16
    assert info["cpu_kernels"]["int8_packed_rows"] == packs16()
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"CPU kernels: {info['cpu_kernels']['isa']};" in text
    assert ("served from the GGUF blocks" in text) == packs16()


def test_inspect_counts_parameters(tmp_path, capsys):
    model = random_tandem_model()
    save_checkpoint(model, tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    parts = json.loads(capsys.readouterr().out)["parts"]
    for part in ("primary", "secondary", "tandem", "drafter", "router"):
        expected = sum(p.numel() for p in getattr(model, part).parameters())
        assert parts[part]["parameters"] == expected, part
        assert parts[part]["bytes"] == expected * 4
        assert parts[part]["dtypes"] == ["F32"]
    assert main(["inspect", str(tmp_path)]) == 0
    assert "primary" in capsys.readouterr().out


def test_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tandem_rt.cli", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "tandem_config.json does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "tandem_rt.cli", "--debug", "inspect", str(tmp_path / "nope")],
                           capture_output=True, text=True)
    assert "Traceback" in debug.stderr
