"""Gives an older genrelay (the catalog benchmark's baseline arm) GENRELAY_SUBMIT_MAX_AGE.

`bench/catalog.py` puts this directory on the PYTHONPATH of the baseline's processes only.
Commits before GENRELAY_SUBMIT_MAX_AGE existed read no such setting, so case (c) could not
shrink their submit budget to the benchmark's size. When the variable is set, this replaces
`service.bootstrap.SUBMIT_POLICY` by a copy with that `max_age` as soon as the module is
imported; `build_services` reads the module global when it runs, so every process (web and
worker) uses it. Nothing else changes. Never on the path of the genrelay arm.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Sequence

_MODULE = "service.bootstrap"


class _PatchSubmitPolicy(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module
        max_age = float(os.environ["GENRELAY_SUBMIT_MAX_AGE"])

        def exec_module(module: types.ModuleType) -> None:
            original(module)
            policy = getattr(module, "SUBMIT_POLICY")  # noqa: B009 (the old code's name)
            setattr(module, "SUBMIT_POLICY", dataclasses.replace(policy, max_age=max_age))  # noqa: B010

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("GENRELAY_SUBMIT_MAX_AGE"):
    sys.meta_path.insert(0, _PatchSubmitPolicy())
