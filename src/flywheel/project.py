"""A Flywheel project: a folder with ``flywheel.toml`` and a ``.flywheel/`` workspace.

```
my-character/
  flywheel.toml              # commented, validated config (the only file users edit)
  .flywheel/
    catalog.sqlite           # every image, lineage, model call, score, verdict, review, run
    store/images/ab/<sha>.png     # normalised RGB images, content-addressed
    store/originals/ab/<sha>.jpg  # the user's files, byte for byte
    runs/ exports/ reports/  # LoRA runs, dataset exports, evaluation reports
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flywheel.catalog import Catalog, open_catalog
from flywheel.catalog.store import ImageStore
from flywheel.config import CONFIG_FILENAME, Config, load_config, render_config_template
from flywheel.errors import ConfigError, ProjectNotFoundError

WORKSPACE = ".flywheel"


@dataclass
class Project:
    root: Path
    config: Config
    catalog: Catalog
    store: ImageStore

    @property
    def workspace(self) -> Path:
        return self.root / WORKSPACE

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init_project(root: Path, *, name: str, trigger: str, exist_ok: bool = False) -> Path:
    """Create ``flywheel.toml`` and the ``.flywheel/`` workspace. Returns the config path."""
    root = root.expanduser().resolve()
    cfg_path = root / CONFIG_FILENAME
    if cfg_path.exists() and not exist_ok:
        raise ConfigError(
            f"{cfg_path} already exists",
            hint="use that project as it is (flywheel -C DIR status), or pick another folder",
        )
    text = render_config_template(name, trigger)  # validates name + trigger first
    root.mkdir(parents=True, exist_ok=True)
    if not cfg_path.exists():
        cfg_path.write_text(text, encoding="utf-8")
    open_project(root).close()  # creates and migrates the catalog
    return cfg_path


def find_project_root(start: Path) -> Path:
    start = start.expanduser().resolve()
    for folder in (start, *start.parents):
        if (folder / CONFIG_FILENAME).is_file():
            return folder
    raise ProjectNotFoundError(
        f"no {CONFIG_FILENAME} in {start} or any folder above it",
        hint="run `flywheel init DIR --name NAME --trigger TOKEN` first, or pass -C DIR",
    )


def open_project(root: Path | None = None) -> Project:
    """Open the project at or above ``root`` (default: $FLYWHEEL_PROJECT or the current folder)."""
    if root is None:
        root = Path(os.environ.get("FLYWHEEL_PROJECT", "."))
    root = find_project_root(root)
    config = load_config(root / CONFIG_FILENAME)
    catalog = open_catalog(root / WORKSPACE / "catalog.sqlite")
    return Project(root=root, config=config, catalog=catalog, store=ImageStore(root / WORKSPACE / "store"))
