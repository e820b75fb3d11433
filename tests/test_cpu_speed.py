"""train/cpu_speed.py: the CPU speed settings behind train.amp / train.channels_last "auto"."""
from __future__ import annotations

import json

import pytest

from dicom_node.train import cpu_speed
from dicom_node.train.cpu_speed import cpu_fast_settings, cpu_features, native_bf16

NATIVE = {"cpu": "AMD EPYC", "capability": "AVX512", "bf16_flags": ["avx512_bf16"], "avx512": True,
          "onednn": True, "onednn_bf16": True, "torch": "2.x"}
PLAIN = {"cpu": "Intel(R) Xeon(R) Processor", "capability": "AVX2", "bf16_flags": [], "avx512": False,
         "onednn": True, "onednn_bf16": False, "torch": "2.x"}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DICOM_NODE_CPU_AMP", raising=False)
    monkeypatch.delenv("DICOM_NODE_CPU_CHANNELS_LAST", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _is_settings(s: dict) -> bool:
    return set(s) == {"amp", "channels_last"} and all(type(v) is bool for v in s.values())


def test_this_machine_returns_bools():
    s = cpu_fast_settings()
    assert _is_settings(s)
    assert s["amp"] == native_bf16()  # the rule: bf16 exactly where it is native
    f = cpu_features()
    assert isinstance(f["bf16_flags"], list) and isinstance(f["capability"], str)


def test_rule_by_cpu_capability():
    assert cpu_fast_settings(features=NATIVE) == {"amp": True, "channels_last": False}
    assert cpu_fast_settings(features=PLAIN) == {"amp": False, "channels_last": False}
    # flags without an AVX-512 torch build / oneDNN bf16 kernels: no bf16
    assert cpu_fast_settings(features={**NATIVE, "capability": "AVX2"})["amp"] is False
    assert cpu_fast_settings(features={**NATIVE, "onednn_bf16": False})["amp"] is False


def test_overrides_win(monkeypatch):
    assert cpu_fast_settings("off", "on", features=NATIVE) == {"amp": False, "channels_last": True}
    assert cpu_fast_settings("bf16", "off", features=PLAIN) == {"amp": True, "channels_last": False}
    assert cpu_fast_settings(True, False, features=PLAIN) == {"amp": True, "channels_last": False}
    assert cpu_fast_settings("auto", "on", features=NATIVE) == {"amp": True, "channels_last": True}
    monkeypatch.setenv("DICOM_NODE_CPU_AMP", "off")
    assert cpu_fast_settings(features=NATIVE)["amp"] is False
    assert cpu_fast_settings("bf16", features=NATIVE)["amp"] is True  # explicit config beats the env
    with pytest.raises(ValueError):
        cpu_fast_settings("sometimes")


def test_machine_without_flags_does_not_crash(monkeypatch, tmp_path):
    empty = tmp_path / "cpuinfo"
    empty.write_text("processor\t: 0\n")
    f = cpu_features(empty)
    assert f["bf16_flags"] == [] and f["cpu"]
    assert native_bf16(f) is False
    missing = cpu_features(tmp_path / "nope")
    assert missing["bf16_flags"] == []
    monkeypatch.setattr(cpu_speed, "cpu_features", lambda *a: (_ for _ in ()).throw(RuntimeError("no cpuinfo")))
    assert cpu_fast_settings() == {"amp": False, "channels_last": False}


def test_measure_is_cached(monkeypatch, tmp_path):
    calls = []

    def fake_time(amp, channels_last, channels, size, repeats):
        calls.append((amp, channels_last, channels))
        return {(False, False): 3.0, (False, True): 4.0, (True, False): 1.0, (True, True): 2.0}[(amp, channels_last)]

    monkeypatch.setattr(cpu_speed, "_time_block", fake_time)
    cache = tmp_path / "speed.json"
    s = cpu_fast_settings(measure=True, features=NATIVE, cache=cache, ngf=8)
    assert s == {"amp": True, "channels_last": False}
    assert calls and all(c == 32 for *_, c in calls)  # 4 * ngf channels
    n = len(calls)
    assert cpu_fast_settings(measure=True, features=NATIVE, cache=cache, ngf=8) == s
    assert len(calls) == n  # second call: from the cache
    assert json.loads(cache.read_text())
    # without native bf16 only fp32 candidates are measured
    calls.clear()
    assert cpu_fast_settings(measure=True, features=PLAIN, cache=None, ngf=8) == {"amp": False, "channels_last": False}
    assert {a for a, _, _ in calls} == {False}


def test_measure_for_real_is_quick():
    s = cpu_speed.measure_settings([(False, False), (False, True)], channels=8, size=16, repeats=1)
    assert type(s["amp"]) is bool and type(s["channels_last"]) is bool and len(s["times_s"]) == 2
