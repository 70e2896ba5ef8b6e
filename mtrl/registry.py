"""A name -> class registry, shared by methods (``mtrl.gradients``) and backbones (``mtrl.nets``).

Besides the registered names, ``get`` resolves plugins (``mtrl/plugins.py``): ``module:Class`` and
``path/to/file.py:Class`` references, and the names an installed package declares in the registry's entry-point
group. A plugin must subclass the registry's base class.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Type


class Registry:
    def __init__(self, kind: str, base: Optional[Callable[[], type]] = None, group: Optional[str] = None) -> None:
        self.kind = kind
        self._classes: Dict[str, type] = {}
        self._base = base  # called lazily: the base class's module may import this registry
        self.group = group  # entry-point group of installed plugins, e.g. "mtrl.methods"
        self._plugins: Dict[str, type] = {}

    def register(self, *names: str) -> Callable[[Type], Type]:
        def deco(cls: Type) -> Type:
            for n in names:
                if n in self._classes:
                    raise KeyError(f"{self.kind} name {n!r} registered twice")
                if ":" in n:
                    raise KeyError(f"{self.kind} name {n!r} holds ':' (reserved for plugin references)")
                self._classes[n] = cls
            return cls

        return deco

    def names(self) -> List[str]:
        """Registered names and installed plugins' entry-point names (built-ins win a clash)."""
        from .plugins import entry_point_names

        return sorted(set(self._classes) | set(entry_point_names(self.group)))

    def base(self) -> type:
        return self._base() if self._base is not None else object

    def get(self, name: str) -> type:
        if name in self._classes:
            return self._classes[name]
        if name in self._plugins:
            return self._plugins[name]
        from . import plugins

        if plugins.is_reference(name):
            cls = plugins.load_class(name, self.kind, self.base())
        else:
            ep = plugins.entry_points(self.group).get(name) if self.group else None
            if ep is None:
                raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}, or a plugin "
                                 "package.module:Class or path/to/file.py:Class")
            cls = plugins.load_entry_point(ep, self.kind, self.base())
        self._plugins[name] = cls
        return cls

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Instantiate ``name``; an unknown name raises ValueError listing the valid ones."""
        return self.get(name)(*args, **kwargs)
