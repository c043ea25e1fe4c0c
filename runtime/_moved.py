"""Old import paths of modules that moved (kept one release): ``tilegraph.bench`` -> ``tilegraph.tools.bench`` ...

An import of an old name (or of anything below it) returns the module at its new path -- the same
module object, so nothing is loaded twice -- and warns with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

MOVED: dict[str, str] = {
    "tilegraph.bench": "tilegraph.tools.bench",
    "tilegraph.gpu_run": "tilegraph.tools.gpu_run",
    "tilegraph.inspect_plan": "tilegraph.tools.inspect_plan",
    "tilegraph.selfcheck": "tilegraph.tools.selfcheck",
    "tilegraph.kernels.compile_check": "tilegraph.tools.compile_check",
    "tilegraph.demo": "tilegraph.serving.demo",
    "tilegraph.models.llama": "tilegraph.serving.llama",
    "tilegraph.models": "tilegraph.serving",
    "tilegraph.reference": "tilegraph.serving.reference",
}


def new_name(fullname: str) -> str | None:
    """The current import path of ``fullname`` when it (or a package above it) moved, else None."""
    for old, new in MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):  # the module at its new path, imported once
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        warnings.warn(f"{fullname} moved to {target_name}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        is_package = importlib.util.find_spec(target_name).submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(target_name), is_package=is_package)


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
