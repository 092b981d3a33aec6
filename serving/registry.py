"""Local endpoints: named directories of model versions with a current pointer.

Layout under the home directory (`TABMODEL_HOME`, default `~/.tabmodel`)::

    endpoints/<name>/versions/<version>/   an unpacked model package
    endpoints/<name>/CURRENT               the name of the version being served

`CURRENT` is replaced atomically, so a server polling it never reads a
half-written version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

HOME_ENV = "TABMODEL_HOME"
DEFAULT_ENDPOINT = "income"


def home() -> Path:
    """Return the directory that contains local endpoints."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".tabmodel")


def endpoint_dir(name: str) -> Path:
    """Return the directory of the local endpoint `name`."""
    return home() / "endpoints" / name


def publish(package: str | os.PathLike, name: str, version: str) -> Path:
    """Copy the unpacked `package` as `version` of endpoint `name`, make it current."""
    root = home()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"{HOME_ENV} is {str(root)!r}, which is not a directory. Point "
            f"{HOME_ENV} at a writable directory, then deploy again (or resume "
            "the run)."
        )
    target = endpoint_dir(name) / "versions" / version
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        shutil.copytree(package, staging, dirs_exist_ok=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pointer = endpoint_dir(name) / "CURRENT"
    partial = pointer.with_suffix(".partial")
    partial.write_text(version + "\n")
    os.replace(partial, pointer)
    return target


def current_version(name: str) -> tuple[str, Path]:
    """Return the current version of endpoint `name` and its directory.

    Raises:
        FileNotFoundError: nothing was deployed to that endpoint yet.
    """
    pointer = endpoint_dir(name) / "CURRENT"
    if not pointer.is_file():
        raise FileNotFoundError(
            f"No model is deployed to the local endpoint {name!r} under {home()}. "
            "Run the flow with --deploy-target local, or pass --model PATH."
        )
    version = pointer.read_text().strip()
    return version, endpoint_dir(name) / "versions" / version
