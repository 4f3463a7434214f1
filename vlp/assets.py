"""Local weight and tokenizer locations. Nothing here downloads: a missing path is an error."""
from __future__ import annotations

import importlib
from pathlib import Path

PACKAGE_PREFIX = "package:"


def resolve_local_dir(spec: str, what: str) -> Path:
    """Turn a config path into an existing local directory.

    `spec` is a filesystem path, or `package:NAME` for a model directory shipped inside an
    installed Python package (NAME exposes `get_model_path()` or a `model/` folder).
    """
    if spec.startswith(PACKAGE_PREFIX):
        name = spec[len(PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise FileNotFoundError(
                f"{what}: package '{name}' is not installed (from '{spec}'); "
                f"pip install it or give a local directory") from err
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if getter else Path(module.__file__).parent / "model"
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {path} (from '{spec}')")
    return path


def resolve_local_file(spec: str, what: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    return path
