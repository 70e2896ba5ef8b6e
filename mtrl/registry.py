"""A name -> class registry, shared by methods (``mtrl.gradients``) and backbones (``mtrl.nets``)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Type


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: Dict[str, type] = {}

    def register(self, *names: str) -> Callable[[Type], Type]:
        def deco(cls: Type) -> Type:
            for n in names:
                if n in self._classes:
                    raise KeyError(f"{self.kind} name {n!r} registered twice")
                self._classes[n] = cls
            return cls

        return deco

    def names(self) -> List[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type:
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._classes[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Instantiate ``name``; an unknown name raises ValueError listing the valid ones."""
        return self.get(name)(*args, **kwargs)
