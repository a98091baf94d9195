"""DeepOBS-style benchmark problems, registered by name.

Importing this package imports every problem module, which fills :data:`PROBLEMS`.
"""

from problems.base import DataSplits, Problem, ProblemInfo
from problems.registry import PROBLEMS, build_problem, get_problem, register

# Problem modules register themselves on import (explicit, in table order).
from problems import quadratic_deep as _quadratic_deep  # noqa: E402,F401
from problems import two_d as _two_d  # noqa: E402,F401
from problems import image_classification as _image_classification  # noqa: E402,F401
from problems import vae as _vae  # noqa: E402,F401
from problems import mnist1d as _mnist1d  # noqa: E402,F401

__all__ = ["DataSplits", "Problem", "ProblemInfo", "PROBLEMS", "build_problem", "get_problem", "register"]
