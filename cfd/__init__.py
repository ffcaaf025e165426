"""cfd3d: Consistent Flow Distillation (the slow path) and its 3D foundation.

Importing this package never imports a CUDA extension: gsplat, nerfacc and tiny-cuda-nn load
lazily, only when a CUDA backend is used.
"""

__version__ = "0.1.0"
