"""Physics-based data: KNN structures, the abTEM pattern library and the scan composer.

The library reader (:mod:`polcore.simulate.library`) is imported here; the abTEM build
(:mod:`polcore.simulate.build`: ``build_library``, ``PROFILES``, ``SimulationConfig``) is imported only when
one of its names is first asked for, and abTEM and ase only inside the functions that simulate.
"""

from polcore.simulate.library import DEFAULT_LIBRARY, PatternLibrary, load_library, rotate_entry

_BUILD_NAMES = ("PROFILES", "SimulationConfig", "build_library")

__all__ = [
    "DEFAULT_LIBRARY",
    "PROFILES",
    "PatternLibrary",
    "SimulationConfig",
    "build_library",
    "load_library",
    "rotate_entry",
]


def __getattr__(name: str):
    if name in _BUILD_NAMES:
        from polcore.simulate import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
