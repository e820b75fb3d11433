"""The strict YAML loader and the config error shared by the node config and the trainer config.

One set of rules for both files: duplicate keys are problems (PyYAML silently keeps the
last), YAML syntax errors carry line and column, nesting deeper than :data:`MAX_NESTING` is
refused (PyYAML composes recursively: 20,000 nested brackets raise ``RecursionError``, which
stopped a node on reload), and every problem is reported at once as a
:class:`ConfigError` (a UserError: one line, exit 1).  Checking keys and values is each
schema's job; :class:`Problems` is the list they collect into (``path: message``).

In the engine because the trainer must not import the node.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import UserError

__all__ = ["MAX_NESTING", "ConfigError", "Problems", "join_path", "type_name", "load_yaml_text", "yaml_problem", "read_yaml_file",
           "load_config_file"]

T = TypeVar("T")

MAX_NESTING = 50  # levels of mappings/lists: configs use fewer than 10, Python's stack allows ~300


class ConfigError(UserError):
    """A config with problems; ``problems`` holds one ``path: message`` string each."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))


class Problems:
    """Collects ``path: message`` strings."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path or '<root>'}: {message}")


def join_path(path: str, key: str | int) -> str:
    """``models`` + ``soft`` -> ``models.soft``; ``routes`` + 0 -> ``routes[0]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    """How a YAML value's type reads in a problem message (``an integer``, ``a mapping``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def load_yaml_text(text: str) -> tuple[Any, list[str]]:
    """``yaml.safe_load`` that also reports duplicate keys: (document, duplicate-key problems).

    Raises ``yaml.YAMLError`` for a document that is not YAML or is nested more than
    :data:`MAX_NESTING` levels deep (see :func:`yaml_problem`).
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        duplicates: list[str]
        nesting = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            """Count the depth while composing (the recursion that a deep document overflows)."""
            self.nesting += 1
            try:
                if self.nesting > MAX_NESTING:
                    raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_NESTING} levels deep",
                                                      self.peek_event().start_mark)  # type: ignore[no-untyped-call]  # types-PyYAML leaves Parser.peek_event unannotated
                return super().compose_node(parent, index)
            finally:
                self.nesting -= 1

    def construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    loader.duplicates.append(f"<yaml> line {key_node.start_mark.line + 1}: duplicate key {key!r}")
                seen.add(key)
            except TypeError:
                pass  # unhashable key: the schema reports it
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    loader = StrictLoader(text)
    loader.duplicates = []
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def yaml_problem(exc: Exception) -> str:
    """A YAML syntax error as one problem string with its line and column."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"<yaml>{where}: {problem}"


def read_yaml_file(path: str | Path) -> tuple[Any, list[str]]:
    """Read a UTF-8 YAML file strictly: (document, duplicate-key problems).

    An unreadable file is a :class:`UserError`; a YAML syntax error a :class:`ConfigError`.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"cannot read config {p}: not UTF-8 text") from None
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_problem(exc)], str(p)) from None


def load_config_file(path: str | Path, parse: Callable[[Any, Path, str], T],
                     prepare: Callable[[Any], Any] | None = None) -> T:
    """Read ``path`` strictly, optionally ``prepare`` the document (flag overrides), then
    ``parse(document, base_dir, source)``: duplicate keys and the schema's problems in one error."""
    p = Path(path)
    raw, duplicates = read_yaml_file(p)
    if prepare is not None:
        raw = prepare(raw)
    try:
        cfg = parse(raw, p.resolve().parent, str(p))
    except ConfigError as exc:
        raise ConfigError(duplicates + exc.problems, str(p)) from None
    if duplicates:
        raise ConfigError(duplicates, str(p))
    return cfg
