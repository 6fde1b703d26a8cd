"""Methods of the papers, one module (or package) each, registered in :data:`METHODS`.

Importing this package imports every module in it, so a new method is one new file here
(see :mod:`kdforge.methods.base` for the contract, and docs/architecture.md for a worked
example).
"""

import importlib
import pkgutil

from kdforge.methods.base import METHODS, BaselinePlan, Method, StudentRun, build_methods, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "BaselinePlan", "Method", "StudentRun", "build_methods", "register_method"]
