"""tools/bench_e2e.py end to end on a tiny random checkpoint: the table, the JSON and the plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def import_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools import each other by plain name)."""
    import importlib

    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TOOLS))


def test_bench_e2e_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench_e2e = import_tool("bench_e2e")
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench_e2e.main(["--random-checkpoint", str(tmp_path / "ckpt"), "--threads", "1", "--max-new-tokens", "6",
                         "--prompt-len", "8", "--batch-sizes", "1,2", "--num-samples", "1", "--gammas", "2",
                         "--repeats", "1", "--json", str(out), "--plot", str(plot)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [(c["batch_size"], c["num_samples"]) for c in report["configs"]] == [(1, 1), (2, 1)]
    for cfg in report["configs"]:
        rows = {(r["mode"], r["gamma"]): r for r in cfg["rows"]}
        assert rows[("primary", 1)]["speedup"] == 1.0
        # every prompt ran once (4 random prompts, 6 tokens each), lossless modes reproduce primary
        assert all(r["tokens"] == 4 * 6 for r in cfg["rows"])
        for key in (("speed", 2), ("tandem-speed", 2), ("tandem-speed", "auto")):
            assert rows[key]["equals_primary"] is True
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tandem-speed" in capsys.readouterr().out


def test_bench_forward_writes_json(tmp_path, capsys):
    bench_forward = import_tool("bench_forward")
    out = tmp_path / "fwd.json"
    rc = bench_forward.main(["--random-checkpoint", str(tmp_path / "ckpt"), "--threads", "1", "--rows", "1,3",
                             "--calls", "3", "--context", "20", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["ms"]) == {"primary", "secondary", "drafter"}
    assert all(set(v) == {"1", "3"} and all(t > 0 for t in v.values()) for v in report["ms"].values())
    assert "primary" in capsys.readouterr().out
    assert report["breakdown_ms"] is None


def test_bench_forward_breakdown_restores_the_ops(tmp_path, capsys):
    """--breakdown times the forward with the plan, as the Python loop and with stand-in ops, and
    puts the real ops back in the engine's module afterwards."""
    import tandem_rt.engine.paged_model as pmod

    bench_forward = import_tool("bench_forward")
    real_cpu, real_qmm = pmod._cpu, pmod.quant_mm
    out = tmp_path / "fwd.json"
    rc = bench_forward.main(["--random-checkpoint", str(tmp_path / "ckpt"), "--threads", "1", "--rows", "1",
                             "--calls", "3", "--context", "20", "--breakdown", "--json", str(out)])
    assert rc == 0
    b = json.loads(out.read_text())["breakdown_ms"]
    assert set(b) == {"full", "python_loop", "without_products", "without_all"} and all(v > 0 for v in b.values())
    assert pmod._cpu is real_cpu and pmod.quant_mm is real_qmm
    assert "without any op" in capsys.readouterr().out


def test_profile_block_phases_add_up_and_restore_the_engine(tmp_path, capsys):
    """profile_block times each phase of the speculative steps of real generations: the verify
    forward, the drafts and the refresh fit inside the whole step, every block is counted, and
    the engine's functions are put back afterwards."""
    from tandem_rt.engine import model_runner, steps

    profile_block = import_tool("profile_block")
    real = (steps.draft, steps.speculative_step, model_runner.run_verify)
    out = tmp_path / "block.json"
    rc = profile_block.main(["--random-checkpoint", str(tmp_path / "ckpt"), "--threads", "1", "--gamma", "2",
                             "--prompt-len", "6", "--max-new-tokens", "9", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    ph = r["phases"]
    assert r["tokens"] == 4 * 9 and r["blocks"] == ph["speculative step (whole)"]["calls"] > 0
    def rows(label):   # "primary forward, 3 row(s)" -> 3
        return int(label.split(", ")[1].split()[0])
    verify = sum(v["total_ms"] for k, v in ph.items() if k.startswith("primary forward") and rows(k) <= 3)
    inner = verify + ph["draft (whole)"]["total_ms"] + ph["verify op"]["total_ms"]   # (refresh: prefills too)
    assert 0 < inner <= ph["speculative step (whole)"]["total_ms"]   # (the prompts' 6-row prefills run outside)
    assert ph["refresh"]["calls"] >= r["blocks"]
    assert ph["secondary forward, 1 row(s)"]["total_ms"] <= ph["draft (whole)"]["total_ms"]
    assert (steps.draft, steps.speculative_step, model_runner.run_verify) == real
    assert "tokens/block" in capsys.readouterr().out


def test_bench_draft_cost_table(tmp_path):
    bench_draft_cost = import_tool("bench_draft_cost")
    out = tmp_path / "cost.json"
    rc = bench_draft_cost.main(["--random-checkpoint", str(tmp_path / "ckpt"), "--threads", "1", "--layers", "1,2",
                                "--vocab", "256,0", "--calls", "3", "--context", "16", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    got = [(r["layers"], r["draft_vocab"]) for r in report["rows"]]
    assert got == [(1, 256), (1, 2048), (2, 256), (2, 2048)]
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in report["rows"])


def test_bench_serving_runs_every_scenario(tmp_path, capsys):
    """tools/bench_serving.py on a random checkpoint: serial, concurrent, Poisson and HTTP rows,
    the bounded load run (no page leaked, the engine serves normally after), the JSON record."""
    pytest.importorskip("httpx")
    bench_serving = import_tool("bench_serving")
    out = tmp_path / "serving.json"
    rc = bench_serving.main(["--random-checkpoint", str(tmp_path / "ckpt"), "--threads", "1", "--clients", "2",
                             "--requests", "3", "--max-new-tokens", "5", "--rate", "50", "--server", "--load", "8",
                             "--load-clients", "3", "--cancel-fraction", "0.5", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    names = [r["scenario"] for r in rec["rows"]]
    assert names == ["engine, serial", "engine, 2 clients", "engine, Poisson 50/s", "HTTP, serial", "HTTP, 2 clients"]
    assert all(r["tokens"] == 15 for r in rec["rows"])
    assert all(r["identical_to_serial"] for r in rec["rows"][1:] if "identical_to_serial" in r)
    load = rec["load_run"]
    assert load["no_page_leaked"] and load["serves_normally_after"] and not load["errors"]
    assert sum(load["outcomes"].values()) >= 8
    assert "engine, 2 clients" in capsys.readouterr().out
