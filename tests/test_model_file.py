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


def _rewrite(src, dst, *, metadata=None, tensors=None):
    """A copy of a model file with some header fields and/or tensors replaced (as a tamperer would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt", device="cpu") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata or {})
    state.update(tensors or {})
    save_file(state, str(dst), metadata=meta)
    return dst


PEAK_SCRIPT = """
import resource, sys
from dicom_node.engine import load_style_model
from dicom_node.errors import UserError
load_style_model(sys.argv[1])  # imports and first-use allocations out of the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_style_model(sys.argv[2])
    print("LOADED")
except UserError as exc:
    print("REFUSED", exc)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_small_file_claiming_a_huge_architecture_is_refused_before_allocating(tmp_path):
    """ngf 256 / 16 blocks over the tensors of an ngf 8 / 2 blocks model: refused from the header's
    shapes; the process's peak memory grows by less than 64 MiB (building the claimed network
    first allocated ~1.2 GB)."""
    honest = tmp_path / "honest.safetensors"
    save_style_model(new_style_model(ngf=8, n_blocks=2, residual=True), honest, name="small")
    liar = _rewrite(honest, tmp_path / "liar.safetensors", metadata={
        "architecture": '{"type": "resnet_generator", "ngf": 256, "n_blocks": 16, "residual": true}'})
    assert liar.stat().st_size < 250_000  # 200 kB
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(honest), str(liar)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "weights do not match the architecture (tensor model.1.bias: stored [8], " \
        "architecture needs [256])" in r.stdout, r.stdout
    growth_kb = int(r.stdout.split("GROWTH_KB")[1])
    assert growth_kb < 64 * 1024, f"peak memory grew by {growth_kb / 1024:.0f} MiB"


@pytest.mark.parametrize("arch", ['["resnet_generator"]', '{"type": "resnet_generator", "ngf": "8", "n_blocks": 2}',
                                  '{"type": "resnet_generator", "ngf": 8, "n_blocks": 100000000}',
                                  '{"type": "resnet_generator", "ngf": 8, "n_blocks": 2, "tone_filter": {"knots": 1}}',
                                  '{"type": "resnet_generator", "ngf": 8, "n_blocks": 2, "tone_filter": {"band_knots": 1}}',
                                  '{"type": "resnet_generator", "ngf": 8, "n_blocks": 2, "tone_filter": {"band_knots": 100000000}}',
                                  '{"type": "resnet_generator", "ngf": 8, "n_blocks": 2, "tone_filter": {"brightness_bins": 4}}',
                                  '{"type": "resnet_generator", "ngf": 8, "n_blocks": 2, '
                                  '"tone_filter": {"band_knots": 9, "brightness_bins": 100000000}}',
                                  '{"type": "resnet_generator", "ngf": 8, "n_blocks": 2, '
                                  '"tone_filter": {"band_knots": 9, "brightness_bins": "4"}}'])
def test_malformed_architectures_are_one_line_user_errors(tmp_path, arch):
    honest = tmp_path / "honest.safetensors"
    save_style_model(new_style_model(ngf=8, n_blocks=2), honest, name="small")
    bad = _rewrite(honest, tmp_path / "bad.safetensors", metadata={"architecture": arch})
    with pytest.raises(UserError) as info:
        load_style_model(bad)
    assert "\n" not in str(info.value)


class _Payload:
    """Unpickling this creates a file: proof of whether a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pytorch_checkpoint_with_a_pickle_payload_is_a_one_line_error_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "x", "state": _Payload(marker)}, evil)
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: unpickling it does create the file
    assert marker.exists()
    marker.unlink()

    cli = [sys.executable, "-m", "dicom_node"]
    for args in (["model", "info", str(evil)], ["translate", "--model", str(evil), "-o", str(tmp_path / "out"),
                                                str(evil)], ["train", "export", str(tmp_path), "--checkpoint", str(evil)]):
        r = subprocess.run(cli + args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "internal error" not in r.stderr, r.stderr
        assert "never" in r.stderr and "run code" in r.stderr, r.stderr
        assert not marker.exists(), f"{args[0]} ran code from the file"


def test_the_bundled_model_is_pinned_and_altered_weights_are_refused(tmp_path):
    """The package's models/digests.json pins the bundled model's weights.  A copy of the folder
    with one weight changed, its header digest recomputed so the file is self-consistent, and the
    pin left as released: refused in one line.  A file the pins do not list is refused too."""
    import json
    import shutil

    from dicom_node.engine.model_file import DIGESTS_FILE, bundled_model_path, weights_digest

    bundled = bundled_model_path()
    pins = json.loads((bundled.parent / DIGESTS_FILE).read_text())
    assert pins[bundled.name]["weights_sha256"] == load_style_model("default").weights_sha256

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(bundled.parent / DIGESTS_FILE, folder / DIGESTS_FILE)
    shutil.copy(bundled, folder / bundled.name)
    assert load_style_model(folder / bundled.name).weights_sha256 == pins[bundled.name]["weights_sha256"]

    from safetensors.torch import load_file

    state = load_file(str(bundled))
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 0.01
    _rewrite(bundled, folder / bundled.name, tensors=state, metadata={"weights_sha256": weights_digest(state)})
    with pytest.raises(UserError) as info:
        load_style_model(folder / bundled.name)
    assert "differ from the digest pinned" in str(info.value) and "\n" not in str(info.value)

    save_style_model(new_style_model(ngf=4, n_blocks=1), folder / "extra.safetensors", name="extra")
    with pytest.raises(UserError, match="not listed"):
        load_style_model(folder / "extra.safetensors")


def test_pin_weights_digest_records_a_new_model_beside_the_others(tmp_path):
    from dicom_node.engine.model_file import pin_weights_digest

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_style_model(new_style_model(ngf=4, n_blocks=1, seed=1), a, name="a")
    save_style_model(new_style_model(ngf=4, n_blocks=1, seed=2), b, name="b")
    assert pin_weights_digest(a) == load_style_model(a).weights_sha256
    with pytest.raises(UserError, match="not listed"):
        load_style_model(b)
    save_style_model(new_style_model(ngf=4, n_blocks=1, seed=3), a, name="a")  # retrained: the old pin refuses it
    with pytest.raises(UserError, match="altered or corrupted"):
        load_style_model(a)
    pin_weights_digest(a), pin_weights_digest(b)
    assert load_style_model(a).name == "a" and load_style_model(b).name == "b"
