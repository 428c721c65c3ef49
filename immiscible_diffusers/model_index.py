"""Reading and writing the pipeline class a saved pipeline's ``model_index.json`` names.

diffusers writes ``"_class_name": "DDPMPipeline"`` for its own pipelines. A pipeline shipped as code in the
model folder is named ``"_class_name": ["pipeline", "FlowMatchingPipeline"]`` (module ``pipeline.py`` beside
``model_index.json``, then the class): with that form ``DiffusionPipeline.from_pretrained(folder_or_repo,
trust_remote_code=True)`` imports the class from the folder, and without ``trust_remote_code`` diffusers
says what to pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_INDEX_NAME = "model_index.json"


def pipeline_class_name(index: Mapping[str, Any]) -> str | None:
    """The pipeline class of a ``model_index.json`` dict: ``"X"`` for ``"X"`` and for ``["module", "X"]``."""
    name = index.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2 and all(isinstance(part, str) for part in name):
        return name[1]
    return name if isinstance(name, str) else None


def code_module(index: Mapping[str, Any]) -> str | None:
    """The module file (without ``.py``) a pipeline shipped as code names, e.g. ``"pipeline"``; else None."""
    name = index.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2 and all(isinstance(part, str) for part in name):
        return name[0]
    return None


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/model_index.json`` as a dict (``FileNotFoundError`` when the folder holds no pipeline)."""
    return json.loads((Path(folder) / MODEL_INDEX_NAME).read_text())


def name_as_shipped_code(folder: str | os.PathLike, module: str) -> Path:
    """Rewrite ``folder/model_index.json`` so that it names its pipeline class as ``[module, class]``.

    ``save_pretrained`` always writes the plain class name; this turns it into the form diffusers loads
    from ``<module>.py`` in the folder. Written atomically; returns the file's path.
    """
    path = Path(folder) / MODEL_INDEX_NAME
    index = read_model_index(folder)
    class_name = pipeline_class_name(index)
    if class_name is None:
        raise ValueError(f"{path} names no pipeline class (_class_name)")
    if not (Path(folder) / f"{module}.py").is_file():
        raise ValueError(f"{path}: the pipeline code {module}.py is not in {str(folder)!r}")
    index["_class_name"] = [module, class_name]
    partial = path.with_name(path.name + ".tmp")
    # save_pretrained's own layout: sorted keys, two-space indent.
    partial.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path
