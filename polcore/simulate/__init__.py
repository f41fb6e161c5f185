"""Physics-based data: KNN structures, the abTEM pattern library and the scan composer.

abTEM and ase are imported only inside the functions that simulate.
"""

from polcore.simulate.library import (
    DEFAULT_LIBRARY,
    PROFILES,
    PatternLibrary,
    SimulationConfig,
    build_library,
    load_library,
    rotate_entry,
)

__all__ = [
    "DEFAULT_LIBRARY",
    "PROFILES",
    "PatternLibrary",
    "SimulationConfig",
    "build_library",
    "load_library",
    "rotate_entry",
]
