"""The manual's links, and the README's config example.

Why: the README is a short front page whose sections moved to docs/ and bench/README.md; a
renamed file or heading would silently leave a reader at a dead link, and a config example
that no longer validates teaches the wrong keys.  This checks every relative link and
#anchor in README.md, docs/*.md and bench/README.md (anchors as GitHub makes them from
headings), that every file of the manual is reachable from the README, and that the README's
config example passes ``dicom-node check-config``.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from dicom_node.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 250  # issue 26: a front page, not the reference manual

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def manual_files() -> list[Path]:
    """The files whose links are checked: the front page, docs/ and the benchmark tables."""
    return [README, *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks: a link shown as code is not a link."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def links(text: str) -> list[tuple[int, str]]:
    """Every link target in ``text`` with its line (inline, image and reference links)."""
    found = []
    for number, line in _prose_lines(text):
        ref = _REFERENCE_LINK.match(line)
        if ref:
            found.append((number, ref.group(1)))
            continue
        # Code spans are kept as text (a link's text may be code) but their brackets are not links.
        line = _CODE_SPAN.sub(lambda m: "code" if "](" in m.group(2) else m.group(0).replace("[", "(").replace("]", ")"),
                              line)
        found += [(number, m.group(1)) for m in _INLINE_LINK.finditer(line)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a Markdown file offers: its headings' slugs (repeats get -1, -2, ...) and HTML anchors."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(text):
        result.update(_HTML_ANCHOR.findall(line))
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(files: list[Path], root: Path) -> list[str]:
    """``file:line: target: reason`` for each relative link whose file or anchor does not exist."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for source in files:
        for number, target in links(source.read_text(encoding="utf-8")):
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto: ... are not this repository's to check
            path_part, _, anchor = target.partition("#")
            dest = (source.parent / path_part).resolve() if path_part else source
            where = f"{source.relative_to(root)}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md":
                if dest not in cache:
                    cache[dest] = anchors(dest.read_text(encoding="utf-8"))
                if anchor not in cache[dest]:
                    problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def test_every_relative_link_and_anchor_in_the_manual_exists():
    assert broken_links(manual_files(), REPO) == []


def test_the_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path):
    """The check above must be able to fail: a tree with one good and two broken links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Reloading the config\n\n## Ports (`node.port`)\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/guide.md#reloading-the-config) and [ok too](docs/guide.md#ports-nodeport)\n"
        "[gone](docs/missing.md) [`code text`](docs/guide.md)\n"
        "```\n[not a link](nowhere.md)\n```\n"
        "see [here](#nothing-here) and `[not a link](nowhere.md)` and [web](https://example.org/x)\n"
    )
    problems = broken_links([tmp_path / "README.md"], tmp_path)
    assert problems == [
        "README.md:2: docs/missing.md: no such file",
        "README.md:6: #nothing-here: no heading with anchor #nothing-here",
    ]


def test_github_anchors_of_the_headings_this_manual_uses():
    assert slug("Real crops (`--source real`)") == "real-crops---source-real"
    assert slug("Export: the pair, and the fidelity guard's calibration") == \
        "export-the-pair-and-the-fidelity-guards-calibration"
    assert slug("Node throughput and load (`bench/node.py`, `bench/load.py`)") == \
        "node-throughput-and-load-benchnodepy-benchloadpy"
    assert anchors("# A\n## B\n## B\n```\n## C\n```\n") == {"a", "b", "b-1"}


def test_every_file_of_the_manual_is_reachable_from_the_readme():
    targets = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README.read_text()) if t}
    unreachable = [str(p.relative_to(REPO)) for p in manual_files()[1:] if p.resolve() not in targets]
    assert unreachable == []
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def readme_config_example() -> str:
    """The one YAML block of the README's "Configuration" section."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the README's Configuration section shows one config example"
    return blocks[0]


def test_the_readme_config_example_passes_check_config(tmp_path, tiny_model_path, capsys):
    """Verbatim but for the server folder (/var/lib/dicom-node exists on a server only) and a
    real tiny model where the example names a model file."""
    text = readme_config_example()
    assert "/var/lib/dicom-node" in text
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text(text.replace("/var/lib/dicom-node", str(tmp_path / "var")))
    raw = yaml.safe_load(text)
    for spec in raw["models"].values():
        if spec["path"] != "default":
            (config.parent / spec["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny_model_path, config.parent / spec["path"])
    assert main(["check-config", str(config)]) == 0, capsys.readouterr().out
    assert "DR_KIM_STYLE" in capsys.readouterr().out


ARCHITECTURE = REPO / "docs" / "architecture.md"
_DOTTED = re.compile(r"`(dicom_node(?:\.\w+)+)(?:\(\))?`")
_PY_PATH = re.compile(r"`((?:dicom_node|engine|train|tests|bench)/[\w/]+\.py)`")
_LAYER_FOLDERS = {"dicom_node.engine": "engine", "dicom_node.train": "train"}


def _module_file(dotted: list[str]) -> Path | None:
    """The source file of a module given as name parts (dicom_node.engine.x -> engine/x.py)."""
    name = ".".join(dotted)
    for package, folder in _LAYER_FOLDERS.items():
        if name == package or name.startswith(package + "."):
            rest = name[len(package):].lstrip(".").split(".") if name != package else []
            base = REPO / folder / Path(*rest) if rest else REPO / folder
            break
    else:
        base = REPO / Path(*dotted)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines(body: list, name: str):
    """The class or function ``name`` defined (or the constant assigned) directly in ``body``."""
    import ast

    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
    return None


def missing_code_names(text: str) -> list[str]:
    """Dotted names (``dicom_node.mod.Class.method``) and paths in ``text`` that the code lacks."""
    import ast

    missing = []
    for path in sorted(set(_PY_PATH.findall(text))):
        if not (REPO / path).is_file():
            missing.append(path)
    for dotted in sorted(set(_DOTTED.findall(text))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
            source = _module_file(parts[:cut])
            if source is not None:
                break
        if source is None:
            missing.append(dotted)
            continue
        body = ast.parse(source.read_text()).body
        for name in parts[cut:]:
            node = _defines(body, name)
            if node is None:
                missing.append(dotted)
                break
            body = getattr(node, "body", [])
    return missing


def test_every_module_and_function_the_architecture_names_exists():
    """docs/architecture.md follows one image through the code by name: a rename must update it."""
    text = ARCHITECTURE.read_text()
    assert len(_DOTTED.findall(text)) >= 15  # the path is written in names the check can resolve
    assert missing_code_names(text) == []


def test_the_name_check_reports_what_the_code_lacks():
    text = ("`dicom_node.ingest.Ingest.store` `dicom_node.engine.tiling.translate` `dicom_node/spool.py`\n"
            "`dicom_node.ingest.Ingest.no_such_method` `dicom_node.no_such_module.f` `engine/no_such_file.py`")
    assert missing_code_names(text) == ["engine/no_such_file.py", "dicom_node.ingest.Ingest.no_such_method",
                                        "dicom_node.no_such_module.f"]
