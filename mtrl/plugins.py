"""Methods and backbones from outside the package: ``module.path:Class``, ``path/to/file.py:Class`` and the
entry-point groups ``mtrl.methods`` / ``mtrl.backbones`` (the contract each must follow: README *Extending*).

A plugin reference is resolved by the same registry as the built-in names (``mtrl.registry.Registry.get``), so
``--method``, ``--backbone``, ``--critic-backbone`` and ``actor_method`` take one wherever they take a name, and
its options are checked by building it once like any other. Every failure is a ``ValueError`` with one line.

Rollout workers (Ray actors) receive only the reference string and import it themselves; a file reference is
therefore made absolute (:func:`normalize`) before a run starts, so it resolves the same in any process and from
any working directory (also on ``--resume``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

_FILE_SUFFIX = ".py"


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message``: a plugin's error in the one line a bad input gets."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def is_reference(name: str) -> bool:
    """``a.b:C`` or ``path/x.py:C`` (a registered name never holds a colon)."""
    return isinstance(name, str) and ":" in name


def _split(ref: str) -> "tuple[str, str]":
    target, _, attr = ref.rpartition(":")
    return target, attr


def _is_file(target: str) -> bool:
    return target.endswith(_FILE_SUFFIX) or os.sep in target or "/" in target


def normalize(name: str) -> str:
    """A file reference with an absolute path (workers and resumed runs may start elsewhere); others unchanged."""
    if not is_reference(name):
        return name
    target, attr = _split(name)
    if _is_file(target):
        return f"{Path(target).expanduser().resolve()}:{attr}"
    return name


def _load_file(target: str, kind: str, ref: str):
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"{kind} plugin {ref!r}: no such file {str(path)!r}; valid: path/to/file.py:Class or "
                         "package.module:Class")
    # One module per file, named after its path: loading the same file twice (driver, registry checks) reuses it,
    # and the name is in sys.modules so its classes pickle by reference within the process.
    mod_name = f"mtrl_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{kind} plugin {ref!r}: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 -- whatever the user's file raises becomes one line
        del sys.modules[mod_name]
        raise ValueError(f"{kind} plugin {ref!r}: importing {str(path)!r} raised {_first_line(e)}") from None
    return module


def _load_module(target: str, kind: str, ref: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise ValueError(f"{kind} plugin {ref!r}: no module named {e.name!r} (install it, put it on PYTHONPATH, or "
                         "give a file: path/to/file.py:Class)") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{kind} plugin {ref!r}: importing {target!r} raised {_first_line(e)}") from None


def load_class(ref: str, kind: str, base: type) -> type:
    """The class named by ``module:Class`` or ``file.py:Class``, checked to subclass ``base``."""
    target, attr = _split(ref)
    if not target or not attr or not attr.isidentifier():
        raise ValueError(f"{kind} plugin {ref!r} is not of the form package.module:Class or path/to/file.py:Class")
    module = _load_file(target, kind, ref) if _is_file(target) else _load_module(target, kind, ref)
    cls = getattr(module, attr, None)
    if cls is None:
        public = sorted(n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"{kind} plugin {ref!r}: {target!r} has no {attr!r}; classes there: "
                         f"{', '.join(public) or 'none'}")
    return check_class(cls, f"{kind} plugin {ref!r}", base)


def check_class(cls: object, label: str, base: type) -> type:
    """``cls`` if it subclasses ``base``; else ValueError starting with ``label``."""
    if not isinstance(cls, type) or not issubclass(cls, base):
        what = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise ValueError(f"{label}: {what} is not a subclass of {base.__module__}.{base.__qualname__} "
                         "(see README 'Extending')")
    return cls


def entry_points(group: str) -> Dict[str, metadata.EntryPoint]:
    """Installed packages' entry points of ``group`` (name -> entry point, not loaded)."""
    try:
        eps = metadata.entry_points(group=group)
    except Exception:  # noqa: BLE001 -- a broken distribution on sys.path must not stop the built-ins
        return {}
    return {ep.name: ep for ep in eps}


def load_entry_point(ep: metadata.EntryPoint, kind: str, base: type) -> type:
    label = f"{kind} {ep.name!r} (entry point {ep.group} = {ep.value})"
    try:
        cls = ep.load()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{label}: loading it raised {_first_line(e)}") from None
    return check_class(cls, label, base)


def entry_point_names(group: Optional[str]) -> List[str]:
    return sorted(entry_points(group)) if group else []
