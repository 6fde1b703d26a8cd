"""kdforge: turn a large teacher model into a small, fast student.

In Python: ``kdforge.load_recipe(path_or_mapping, overrides)`` and ``kdforge.run(recipe) -> Report``
(:mod:`kdforge.api`); losses as ``from kdforge.losses import hinton_kd``.
"""

__version__ = "0.1.0"

__all__ = ["Report", "load_recipe", "run", "__version__"]


def __getattr__(name: str):
    # loaded on first use: `import kdforge` (and the CLI's start) stays free of torch and transformers
    if name in ("Report", "load_recipe", "run"):
        from kdforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdforge' has no attribute {name!r}")
