"""``tandem-rt generate`` on a saved random checkpoint."""
from __future__ import annotations

import json

from engine_models import agreeing_tandem_model
from tandem_rt.checkpoint import save_checkpoint
from tandem_rt.cli import main
from tandem_rt.engine import Engine, SamplingParams


def test_generate_cli_json(tmp_path, capsys):
    model = agreeing_tandem_model(seed=21, layer_scale=0.4)
    save_checkpoint(model, tmp_path / "ckpt")
    want = Engine(model, num_pages=64).generate([[4, 5, 6]], SamplingParams(max_new_tokens=6, ignore_eos=True),
                                                mode="speed", gamma=2)
    rc = main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt-ids", "4,5,6", "--mode", "speed",
               "--gamma", "2", "--max-new-tokens", "6", "--ignore-eos", "--dtype", "float32", "--json", "--stats"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["token_ids"] == want[0].token_ids
    assert out[0]["stats"]["primary_runs"] >= 1
    # errors are one line on stderr, exit code 2
    rc = main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "hello", "--max-new-tokens", "4"])
    assert rc == 2 and "no tokenizer" in capsys.readouterr().err
    rc = main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt-ids", "1,2", "--gamma", "x"])
    assert rc == 2 and "gamma" in capsys.readouterr().err
