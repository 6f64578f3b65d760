"""The layers point one way (docs/STYLE: "the shape of the core"), checked on the source with `ast`:

(a) no module imports another module's `_private` name (`from X import _name`, `X._name` on an
    imported project module); a `_private` module is importable only inside its own package;
(b) nothing in the runtime (`storymem_rt/`) imports the build stage (`storymem_rt.export`),
    except the CLI's `build-engines` and `doctor` commands, inside their functions, nor the
    benchmarks (`storymem_rt.benchmarks`), except the CLI's `bench` command;
(c) no `__class__` assignment (one model class, options at construction);
(d) no file over 800 lines;
(e) one `class FP8Linear` and one assignment of the FP8 max constant (`FP8_MAX = ...`) in the
    repository.
"""
from __future__ import annotations

import ast
from pathlib import Path


from conftest import REPO

# Installed layout (setup.py): export/ is storymem_rt.export, kernels/ is storymem_rt.kernels.
PACKAGES = {"storymem_rt": "storymem_rt", "export": "storymem_rt.export", "kernels": "storymem_rt.kernels",
            "benchmarks": "storymem_rt.benchmarks"}
MAX_LINES = 800
CLI_BUILD_COMMANDS = {"build_engines_cmd", "doctor"}  # cli.py functions that may import storymem_rt.export
CLI_BENCH_COMMANDS = {"bench"}  # cli.py functions that may import storymem_rt.benchmarks


def _files(folders=tuple(PACKAGES)) -> list[Path]:
    return sorted(p for d in folders for p in (REPO / d).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _module_name(rel: str) -> str:
    parts = list(Path(rel).with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """Whether a dotted name under storymem_rt is a module or package of this repository."""
    if name == "storymem_rt":
        return True
    for top, pkg in PACKAGES.items():
        if name == pkg or name.startswith(pkg + "."):
            rest = name[len(pkg):].lstrip(".").split(".") if name != pkg else []
            base = REPO.joinpath(top, *rest)
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _imports(path: Path, rel: str):
    """(node, absolute module imported from, alias, enclosing top-level function name or None)."""
    module, is_package = _module_name(rel), path.name == "__init__.py"
    tree = _parse(path)
    for top in tree.body:
        func = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield node, alias.name, alias, func
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, module, is_package)
                for alias in node.names:
                    yield node, target, alias, func


def _package_of(module: str) -> str:
    return module.rsplit(".", 1)[0]


def private_imports(path: Path, rel: str | None = None) -> list[str]:
    """(a) for one file (`rel`: where it stands in the repository, default its real place)."""
    rel = rel or _rel(path)
    module = _module_name(rel)
    own_package = module if path.name == "__init__.py" else _package_of(module)
    bad, module_aliases = [], {}
    for node, target, alias, _ in _imports(path, rel):
        if not (target == "storymem_rt" or target.startswith("storymem_rt.")):
            continue
        if isinstance(node, ast.ImportFrom):
            full = f"{target}.{alias.name}"
            if _is_module(full):  # `from pkg import module`
                module_aliases[alias.asname or alias.name] = full
                if _private(alias.name) and target != own_package:
                    bad.append(f"{rel}:{node.lineno}: imports private module {full}")
            elif _private(alias.name) and target != module:
                bad.append(f"{rel}:{node.lineno}: imports {alias.name} from {target}")
        elif alias.asname:
            module_aliases[alias.asname] = target
        parts = target.split(".")
        for i, part in enumerate(parts):
            if _private(part) and ".".join(parts[:i]) != own_package:
                bad.append(f"{rel}:{node.lineno}: imports from private module {target}")
                break
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            dotted = []
            while isinstance(base, ast.Attribute):
                dotted.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                target = ".".join([module_aliases.get(base.id, base.id), *dotted])
                if target in module_aliases.values() or (base.id == "storymem_rt" and _is_module(target)):
                    if target != module:
                        bad.append(f"{rel}:{node.lineno}: uses {target}.{node.attr}")
    return bad


def export_imports(path: Path, rel: str | None = None) -> list[str]:
    """(b) for one file of the runtime."""
    rel, bad = rel or _rel(path), []
    for node, target, alias, func in _imports(path, rel):
        full = target if isinstance(node, ast.Import) else f"{target}.{alias.name}"
        for layer, allowed in (("storymem_rt.export", CLI_BUILD_COMMANDS), ("storymem_rt.benchmarks", CLI_BENCH_COMMANDS)):
            if full == layer or full.startswith(layer + ".") or target.startswith(layer):
                if rel == "storymem_rt/cli.py" and func in allowed:
                    continue
                bad.append(f"{rel}:{node.lineno}: imports {full}" + (f" (in {func})" if func else ""))
    return bad


def class_assignments(path: Path, rel: str | None = None) -> list[str]:
    """(c) for one file."""
    rel, bad = rel or _rel(path), []
    for node in ast.walk(_parse(path)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr == "__class__":
                bad.append(f"{rel}:{node.lineno}: assigns __class__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and len(
                node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "__class__":
            bad.append(f"{rel}:{node.lineno}: assigns __class__ through setattr")
    return bad


def long_file(path: Path) -> list[str]:
    """(d) for one file."""
    n = len(path.read_text().splitlines())
    return [f"{_rel(path)}: {n} lines (at most {MAX_LINES})"] if n > MAX_LINES else []


def _all(check, files) -> list[str]:
    return [v for f in files for v in check(f)]


def test_no_module_imports_a_private_name_of_another():
    bad = _all(private_imports, _files())
    assert not bad, "\n".join(bad)


def test_the_runtime_does_not_import_the_build_stage():
    bad = _all(export_imports, _files(["storymem_rt"]))
    assert not bad, "\n".join(bad)


def test_no_class_swapping():
    bad = _all(class_assignments, _files())
    assert not bad, "\n".join(bad)


def test_no_file_over_800_lines():
    bad = _all(long_file, _files())
    assert not bad, "\n".join(bad)


def _repo_py_files() -> list[Path]:
    skip = {".git", "build", "dist", ".venv", "venv"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)
                  and not any(part.endswith(".egg-info") for part in p.relative_to(REPO).parts))


def _definitions() -> tuple[list[str], list[str]]:
    classes, constants = [], []
    for path in _repo_py_files():
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ClassDef) and node.name == "FP8Linear":
                classes.append(f"{_rel(path)}:{node.lineno}")
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) and node.value is not None else []
            for t in targets:
                names = t.elts if isinstance(t, ast.Tuple) else [t]
                if any(isinstance(n, ast.Name) and n.id == "FP8_MAX" for n in names):
                    constants.append(f"{_rel(path)}:{node.lineno}")
    return classes, constants


def test_one_fp8_linear_and_one_fp8_max():
    classes, constants = _definitions()
    assert len(classes) == 1, f"class FP8Linear defined at {classes}"
    assert len(constants) == 1, f"FP8_MAX assigned at {constants}"


def test_the_checks_see_what_they_look_for(tmp_path):
    """The checkers flag the patterns they exist for (a checker that sees nothing passes vacuously)."""
    src = tmp_path / "probe.py"
    src.write_text("from .checkpoint import _private_thing\nfrom . import story\nstory._helper()\n"
                   "from .export.build import Builder\nimport storymem_rt.checkpoint as ck\nck._x = 1\n"
                   "from ._own import x\nfrom .kernels._triton import jit\n"
                   "def f(m):\n    m.__class__ = object\n    from .export import doctor\n"
                   "from .benchmarks.dit import run\n")
    rel = "storymem_rt/probe.py"
    assert len(private_imports(src, rel)) == 4, private_imports(src, rel)
    assert len(export_imports(src, rel)) == 3, export_imports(src, rel)
    assert len(class_assignments(src, rel)) == 1
    assert private_imports(src, "kernels/probe.py")[-1].endswith("uses storymem_rt.checkpoint._x")
