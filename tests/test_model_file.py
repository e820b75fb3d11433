"""Style model files: round trip, metadata, and refusal of anything that is not one."""
import pickle
import subprocess
import sys

import pytest
import torch

from dicom_node.engine import load_style_model, new_style_model, save_style_model
from dicom_node.errors import UserError


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    gen = new_style_model(ngf=4, n_blocks=2, seed=3)
    path = save_style_model(gen, tmp_path / "m.safetensors", name="kim", direction="B->A",
                            provenance={"steps": 7})
    model = load_style_model(path)
    assert model.name == "kim"
    assert model.metadata["direction"] == "B->A"
    assert model.metadata["provenance"] == {"steps": 7}
    assert model.metadata["architecture"]["n_blocks"] == 2
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.generator(x), gen(x))


def test_saved_model_has_the_umask_mode(tmp_path):
    """A model is meant to be shared (copied to /etc/dicom-node/models for the service user):
    it gets the mode of an ordinary file, not the temp file's 0600."""
    import os

    old = os.umask(0o022)
    try:
        path = save_style_model(new_style_model(ngf=4, n_blocks=1), tmp_path / "m.safetensors", name="m")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = save_style_model(new_style_model(ngf=4, n_blocks=1), tmp_path / "p.safetensors", name="p")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_init_is_deterministic_and_standard(tmp_path):
    a, b = new_style_model(ngf=8, n_blocks=1, seed=5), new_style_model(ngf=8, n_blocks=1, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    w = a.model[1].weight
    assert abs(w.std().item() - 0.02) < 0.005


def test_residual_generator_starts_at_identity():
    gen = new_style_model(ngf=4, n_blocks=1, residual=True)
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(gen(x), x)


def test_pickle_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError):
        load_style_model(bad)
    assert not marker.exists()


def test_cli_model_info_and_errors(tmp_path):
    out = tmp_path / "m.safetensors"
    cli = [sys.executable, "-m", "dicom_node"]
    r = subprocess.run(cli + ["model", "init", str(out), "--ngf", "4", "--blocks", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cli + ["model", "info", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "resnet_generator" in r.stdout
    r = subprocess.run(cli + ["model", "info", str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "not found" in r.stderr
