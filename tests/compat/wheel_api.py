"""Check a vLLM release the loader cannot run here (a CUDA wheel) by reading its source.

    python -m tests.compat.wheel_api vllm-0.33.0-....whl   # or a directory holding vllm/

Nothing is installed or imported from the release: each module the loader needs is parsed
(ast) from the wheel, the functions and classes in loader.integration.vllm_compat.NEEDS are turned into
stand-ins that carry the parsed signatures, fields and abstract methods, and the adapter's
own probe runs on them, so the check applies exactly the rules the adapter applies at
import. Prints one line per piece; exits 1 when a required piece is missing or changed.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

from loader.integration.vllm_compat import NEEDS, REQUIRED, Surface, probe

P = inspect.Parameter


class Source:
    """The .py files of a wheel (or of a directory holding the package)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            self._files = {str(p.relative_to(path)): p for p in (path / "vllm").rglob("*.py")}
            self._read = lambda name: self._files[name].read_text()
            self.version = _version_from_dir(path)
        else:
            wheel = zipfile.ZipFile(path)
            self._files = {n: n for n in wheel.namelist() if n.endswith(".py")}
            self._read = lambda name: wheel.read(name).decode()
            self.version = _version_from_wheel(wheel)
        self._trees: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._trees:
            base = name.replace(".", "/")
            for candidate in (f"{base}.py", f"{base}/__init__.py"):
                if candidate in self._files:
                    self._trees[name] = ast.parse(self._read(candidate))
                    break
            else:
                self._trees[name] = None
        return self._trees[name]

    def is_package(self, name: str) -> bool:
        return f"{name.replace('.', '/')}/__init__.py" in self._files


def _version_from_wheel(wheel: zipfile.ZipFile) -> str:
    for name in wheel.namelist():
        if name.endswith(".dist-info/METADATA"):
            match = re.search(r"^Version: (\S+)", wheel.read(name).decode(), re.M)
            if match:
                return match.group(1)
    return "unknown"


def _version_from_dir(path: Path) -> str:
    for candidate in (path / "vllm" / "_version.py",):
        if candidate.exists():
            match = re.search(r"__version__ = version = ['\"]([^'\"]+)", candidate.read_text())
            if match:
                return match.group(1)
    return "unknown"


def _top_level(tree: ast.Module):
    """Statements at module level, including those under try/if (but not TYPE_CHECKING)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            stack[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack[:0] = node.body + [s for h in node.handlers for s in h.body] + node.orelse
        else:
            yield node


def resolve(source: Source, module: str, attr: str, depth: int = 0):
    """(kind, node, module) for `module.attr`, following re-exports; None if absent."""
    tree = source.module(module)
    if tree is None or depth > 10:
        return None
    found = None
    for node in _top_level(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == attr:
                found = ("class" if isinstance(node, ast.ClassDef) else "function", node, module)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == attr:
                    origin = _absolute(source, module, node)
                    found = resolve(source, origin, alias.name, depth + 1) or (
                        ("module", None, f"{origin}.{alias.name}")
                        if source.module(f"{origin}.{alias.name}") is not None
                        else ("unresolved", node, origin)
                    )
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                found = ("value", node, module)
    return found


def _absolute(source: Source, module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if source.is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def signature_of(fn: ast.FunctionDef) -> inspect.Signature:
    a = fn.args
    params = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = P.POSITIONAL_ONLY if i < len(a.posonlyargs) else P.POSITIONAL_OR_KEYWORD
        params.append(P(arg.arg, kind, default=P.empty if default is None else ...))
    if a.vararg:
        params.append(P(a.vararg.arg, P.VAR_POSITIONAL))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append(P(arg.arg, P.KEYWORD_ONLY, default=P.empty if default is None else ...))
    if a.kwarg:
        params.append(P(a.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def _function(node: ast.FunctionDef, qualname: str):
    def stand_in(*args, **kwargs):
        raise RuntimeError("a stand-in read from source; not callable")

    stand_in.__signature__ = signature_of(node)
    stand_in.__qualname__ = stand_in.__name__ = qualname
    return stand_in


def _is_abstract(fn: ast.FunctionDef) -> bool:
    return any("abstractmethod" in ast.unparse(d) for d in fn.decorator_list)


def _class(source: Source, node: ast.ClassDef, module: str):
    """A stand-in class: methods with their parsed signatures (own and inherited from bases
    found in the source), annotated fields, and the abstract methods left unimplemented."""
    methods: dict = {}
    fields: dict = {}
    abstract: set[str] = set()
    for base_node, _ in reversed(_lineage(source, node, module)):
        for item in base_node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                methods[item.name] = _function(item, f"{base_node.name}.{item.name}")
                (abstract.add if _is_abstract(item) else abstract.discard)(item.name)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields[item.target.id] = ast.unparse(item.annotation)
    namespace = {**methods, "__annotations__": fields, "__module__": module}
    cls = type(node.name, (), namespace)
    cls.__abstractmethods__ = frozenset(abstract)
    return cls


def _lineage(source: Source, node: ast.ClassDef, module: str, depth: int = 0):
    """The class and its bases that are defined in the source, nearest first."""
    chain = [(node, module)]
    if depth > 10:
        return chain
    for base in node.bases:
        if isinstance(base, ast.Name):
            found = resolve(source, module, base.id)
            if found and found[0] == "class":
                chain += _lineage(source, found[1], found[2], depth + 1)
    return chain


def static_importer(source: Source):
    """An import_module for vllm_compat.probe that builds modules from parsed source."""
    wanted: dict[str, set[str]] = {}
    for need in NEEDS:
        for place in need.where:
            module, _, attr = place.partition(":")
            wanted.setdefault(module, set()).add(attr)

    def import_module(name: str):
        if name == "vllm":
            return SimpleNamespace(__version__=source.version)
        if source.module(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r} in the wheel")
        module = SimpleNamespace(__name__=name)
        for attr in wanted.get(name, ()):
            found = resolve(source, name, attr)
            if found is None:
                continue
            kind, node, origin = found
            if kind == "function":
                setattr(module, attr, _function(node, attr))
            elif kind == "class":
                setattr(module, attr, _class(source, node, origin))
            else:  # present, but its shape cannot be read statically
                setattr(module, attr, _Opaque(f"{kind} in {origin}"))
        return module

    return import_module


class _Opaque:
    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


def check(path: str | Path) -> Surface:
    return probe(static_importer(Source(path)))


def report(surface: Surface) -> str:
    lines = [f"vLLM {surface.version}: API surface netloader uses, read from source"]
    for need in NEEDS:
        if need.name in surface.found:
            lines.append(f"  ok       {need.name:32} {surface.where[need.name]}")
        else:
            tag = "MISSING " if need.required else "absent  "
            lines.append(f"  {tag} {need.name:32} {surface.problems[need.name]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    surface = check(argv[0])
    print(report(surface))
    if surface.missing():
        print(surface.error())
        return 1
    print(f"ok: every required piece is present with the shape the loader uses ({len(REQUIRED)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
