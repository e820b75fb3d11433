"""docs/dicomweb.md: its config examples pass the node's schema and it names every key of both sides.

Why: the page shows configs for Orthanc, dcm4chee-arc and cloud stores; a renamed key would leave
an example that teaches a config the node refuses.  Schema only (no file is read, nothing is
dialled): the examples name server paths and hosts.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from dicom_node.config.schema import parse_schema
from dicom_node.destinations.dicomweb import KIND

DOC = Path(__file__).resolve().parents[1] / "docs" / "dicomweb.md"


def yaml_examples(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)


def schema_problems(example: str) -> list[str]:
    """The problems of a config made of ``example`` (destinations and/or web) plus a route to each
    destination it defines (or the example's own routes, to its destinations or an ``outbox``)."""
    raw = yaml.safe_load(example)
    destinations = raw.get("destinations") or {"outbox": {"type": "folder", "path": "outbox"}}
    config = {"storage": {"spool_dir": "spool"}, "models": {"soft": {"path": "soft.safetensors"}},
              "destinations": destinations,
              "routes": raw.get("routes") or [{"called_ae": "DR_KIM_STYLE", "model": "soft",
                                                "destinations": list(destinations)}],
              **({"web": raw["web"]} if "web" in raw else {})}
    _, problems = parse_schema(config, base_dir=Path("/etc/dicom-node"))
    return problems


def test_every_config_example_passes_the_schema():
    examples = yaml_examples(DOC.read_text())
    assert len(examples) >= 8  # the key table's, Orthanc, dcm4chee (2), Google, Azure, web.stow_rs (2)
    assert {k for e in examples for k in yaml.safe_load(e)} == {"destinations", "web", "routes"}
    for example in examples:
        assert schema_problems(example) == [], example


def test_the_schema_check_fails_on_a_wrong_key():
    assert schema_problems("destinations:\n  a: {type: dicomweb, url: http://x/rs, auth: {bearer-file: t}}\n")
    assert schema_problems("web:\n  stow_rs: {client_ca: ca.pem}\n")  # needs web.tls


def test_the_page_names_every_key():
    """In the prose (code spans), not only in the examples: each key is explained somewhere."""
    spans = " ".join(re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", DOC.read_text(), flags=re.DOTALL)))
    for key in sorted(KIND.keys) + ["basic", "user", "password_file", "bearer_file", "bearer_env", "ca", "verify",
                                    "cert", "key", "web.stow_rs.tokens", "web.stow_rs.client_ca",
                                    "web.stow_rs.subjects", "stow_rs_clients"]:
        assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", spans), key
