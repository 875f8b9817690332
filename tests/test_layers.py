"""Dependencies point one way: storage/config at the bottom, then sources → audio → features → train → tune →
publish → report, the job and the CLI on top. A module may import its own layer or lower ones, never higher."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "whisper_lora"
LAYERS = [
    ["storage", "languages", "text", "models.sizes", "models.audio_context", "train.precision"],
    ["config", "metrics", "manifest", "console"],
    ["ray_runtime", "resources", "models"],
    ["data.sources", "data.audio"],
    ["data.features", "data.stats", "data.collate", "data.prepared", "data.epochs", "demo"],
    ["data.pipeline", "evaluate"],
    ["prepare", "encode", "score"],
    ["train"],
    ["tune", "tune.state", "cost"],
    ["publish", "portable"],
    ["report", "transcribe", "export"],
    ["job"],
    ["cli"],
]


def layer_of(module: str) -> int:
    """Index of the most specific entry naming ``module`` (``whisper_lora.`` removed) or its package."""
    matches = [
        (len(name), index)
        for index, names in enumerate(LAYERS)
        for name in names
        if module == name or module.startswith(f"{name}.")
    ]
    assert matches, f"whisper_lora.{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("whisper_lora."):
            found.add(node.module.removeprefix("whisper_lora."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("whisper_lora.") for a in node.names if a.name.startswith("whisper_lora.")}
    return found


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module.endswith("__init__") or module == "__main__":
            continue
        own = layer_of(module)
        upward += [f"{module} → {target}" for target in sorted(imports_of(path)) if layer_of(target) > own]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from whisper_lora.report import report_files\nimport whisper_lora.job\n")
    assert imports_of(bad) == {"report", "job"}
    assert layer_of("report") > layer_of("publish") > layer_of("tune.select") > layer_of("train.loop")


def test_a_tune_trial_and_the_train_controller_import_no_model_libraries():
    """Each trial starts two Python processes that never build a model: the Tune trial (it unpickles
    ``tune.trainable.train_trial``) and Ray Train's controller (it unpickles ``train.entry.train_loop_per_worker``).
    Importing peft (bitsandbytes with it) and transformers' modeling code there cost ~16 s per process on a loaded
    2-core node; only the workers need them."""
    import subprocess
    import sys

    heavy = ["peft", "bitsandbytes", "transformers.modeling_utils", "whisper_lora.train.loop"]
    code = (
        "import sys, whisper_lora.tune.trainable, whisper_lora.train.entry\n"
        f"print([name for name in {heavy!r} if name in sys.modules])"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
