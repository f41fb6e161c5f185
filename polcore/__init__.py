"""polbench core library: simulation, models, inference, storage and analysis of 4D-STEM polarization maps.

Heavy dependencies (torch, abtem, umap) are imported inside the functions that need them.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
