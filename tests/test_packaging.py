"""The distribution installs the folders at the repo root inside the mmmae namespace, with the configs,
in a normal (non-editable) install as well as the editable one the suite runs on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def test_editable_install_maps_the_method_folders() -> None:
    import mmmae.image
    import mmmae.video
    import mmmae.vl
    assert Path(mmmae.image.__file__).parent == ROOT / "image"
    assert Path(mmmae.video.__file__).parent == ROOT / "video"
    assert Path(mmmae.vl.__file__).parent == ROOT / "vl"


@pytest.mark.slow
def test_normal_install_has_every_package_config_and_model(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert not (target / "image").exists() and not (target / "video").exists()  # nothing generic at top level
    assert (target / "mmmae" / "configs" / "sizes" / "vit_base.yaml").is_file()
    assert (target / "mmmae" / "configs" / "lists" / "tiny_kinetics.txt").is_file()
    code = ("import mmmae, mmmae.image, mmmae.video, mmmae.vl; from mmmae.config import load_config; "
            "assert all(m.__file__.startswith(%r) for m in (mmmae, mmmae.image, mmmae.video, mmmae.vl)); "
            "print(sorted(mmmae.list_models())); load_config('video_mae.yaml'); load_config('m3ae_tiny.yaml')"
            % str(target))
    # -S: no site processing, so the editable install's import hook stays out; the dependencies come
    # from this environment's site-packages, after the installed copy.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path,
                         env={"PYTHONPATH": f"{target}:{site}", "PATH": ""}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("mae", "simmim", "videomae", "omnimae", "bevt", "bevt_spatial", "m3ae", "retrieval", "classifier"):
        assert f"'{name}'" in res.stdout


# Who may import whom (DESIGN.md): the core never imports a method package, the engine or tools;
# method packages import neither the engine, tools nor each other.
_LAYERS = {
    "mmmae": ("mmmae.image", "mmmae.video", "mmmae.vl", "mmmae.engine", "tools"),
    "mmmae/engine": ("mmmae.image", "mmmae.video", "mmmae.vl", "tools"),
    "image": ("mmmae.video", "mmmae.vl", "mmmae.engine", "tools"),
    "video": ("mmmae.image", "mmmae.vl", "mmmae.engine", "tools"),
    "vl": ("mmmae.image", "mmmae.video", "mmmae.engine", "tools"),
}


def _imports(path: Path) -> list[str]:
    import ast
    mods: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods.append(node.module)
        elif isinstance(node, ast.Import):
            mods.extend(a.name for a in node.names)
    return mods


def test_layering_core_engine_and_methods_import_only_downwards() -> None:
    root = Path(__file__).resolve().parents[1]
    seen, bad = 0, []
    for layer, forbidden in _LAYERS.items():
        for f in sorted((root / layer).rglob("*.py")):
            if layer == "mmmae" and (root / "mmmae" / "engine") in f.parents:
                continue  # the engine has its own row
            seen += 1
            bad += [f"{f.relative_to(root)} imports {m}" for m in _imports(f)
                    if any(m == x or m.startswith(x + ".") for x in forbidden)]
    assert seen > 40, seen  # the walk found the packages
    assert not bad, bad
