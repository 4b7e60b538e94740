"""`python -m regft_jax.convert` in both directions, and its one-line errors."""

import numpy as np
import transformers

from regft_jax import checkpoint, models
from regft_jax.convert import main
from tests.hf_reference import hf_logits, make_hf_model


def test_cli_round_trip(tmp_path, capsys):
    model = make_hf_model("falcon_7b_mqa")
    model.save_pretrained(str(tmp_path / "hf"))
    assert main(["hf-to-flax", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    cfg, params = checkpoint.load_model(str(tmp_path / "ckpt"))
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(np.asarray(models.forward(cfg, params, ids)), ref, atol=1e-4)
    assert main(["flax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.FalconForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    np.testing.assert_allclose(hf_logits(back, ids), ref, atol=1e-4)
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["hf-to-flax", "--hf_dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.json" in err and "\n" not in err
    assert main(["flax-to-hf", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "y")]) == 2
    assert "not a regft_jax model checkpoint" in capsys.readouterr().err
