"""The offline install: `scripts/wheelhouse.py` (what goes into the folder, what the target has already, the check
that the folder alone resolves every requirement) and `make install WHEELHOUSE=...` (no index, that folder). Offline:
the wheelhouse here is made of placeholder wheels carrying the installed packages' real metadata."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
sys.modules["wheelhouse"] = wheelhouse  # its dataclasses look their module up
spec.loader.exec_module(wheelhouse)

TARGET = wheelhouse.Target("3.11", "manylinux_2_28_x86_64")


def test_platform_tags_take_in_every_older_manylinux():
    tags = wheelhouse.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux1_x86_64"
    # bitsandbytes ships manylinux_2_24, tokenizers manylinux_2_17 / manylinux2014: pip would skip them otherwise
    assert {"manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= set(tags)
    assert "manylinux_2_31_x86_64" not in tags
    assert wheelhouse.platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]


def test_requirements_are_the_packages_its_extras_and_its_build():
    requirements = wheelhouse.project_requirements(["deepspeed"])
    names = [wheelhouse.requirement_name(r) for r in requirements]
    assert {"torch", "trl", "transformers", "bitsandbytes", "datasets", "deepspeed", "setuptools", "wheel"} <= set(
        names
    )
    assert "flash-attn" not in names and "pytest" not in names
    with pytest.raises(wheelhouse.WheelhouseError, match=r"pyproject.toml: no extra named cuda \(there are flash"):
        wheelhouse.project_requirements(["cuda"])


def test_what_the_target_has_is_left_out_when_every_requirement_allows_its_version(tmp_path):
    frozen = tmp_path / "freeze.txt"
    frozen.write_text("numpy==2.5.2\ntransformers==5.17.0\npyarrow\n# a comment\nsetuptools==80.0\n-e git+x#egg=y\n")
    installed = wheelhouse.read_installed(frozen)
    assert installed == {"numpy": "2.5.2", "transformers": "5.17.0", "pyarrow": None, "setuptools": "80.0"}
    distributions = [
        wheelhouse.Distribution("transformers", "5.24.0", "", ("numpy>=1.17", "pytest; extra == 'testing'")),
        wheelhouse.Distribution("numpy", "2.4.6", ""),
        wheelhouse.Distribution("pyarrow", "26.0.1", ""),
        wheelhouse.Distribution("setuptools", "84.2.1", ""),
        wheelhouse.Distribution("trl", "1.16.0", "", ("transformers>=5.0",)),
    ]
    requirements = ["transformers>=5.24,<6", "trl>=1.16", "setuptools>=68"]
    left_out = wheelhouse.already_installed(distributions, installed, requirements, TARGET, keep=("setuptools",))
    # numpy 2.5.2 meets transformers' numpy>=1.17; pyarrow is trusted; transformers 5.17 is below 5.24; setuptools
    # ships for the isolated build whatever the target has
    assert [d.name for d in left_out] == ["numpy", "pyarrow"]
    stricter = [*requirements, "numpy<2.5; python_version >= '3.11'"]
    left_out = wheelhouse.already_installed(distributions, installed, stricter, TARGET, keep=("setuptools",))
    assert [d.name for d in left_out] == ["pyarrow"]


def _placeholder_wheel(folder: Path, distribution: importlib.metadata.Distribution) -> None:
    """A wheel holding only `distribution`'s installed metadata: what pip resolves against, offline."""
    name = wheelhouse.normalize(distribution.metadata["Name"]).replace("-", "_")
    version = distribution.version
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", distribution.read_text("METADATA"))
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")


@pytest.fixture(scope="module")
def fake_wheelhouse(tmp_path_factory) -> Path:
    """Every distribution of this environment but PyTorch and the package itself, as placeholder wheels."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    seen = set()
    for distribution in importlib.metadata.distributions():
        name = wheelhouse.normalize(distribution.metadata["Name"])
        if name in seen or name in ("torch", "safekey-trl") or name.startswith("nvidia-"):
            continue
        seen.add(name)
        _placeholder_wheel(folder, distribution)
    if "wheel" not in seen:  # a build requirement that this environment lacks
        with zipfile.ZipFile(folder / "wheel-0.45.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr("wheel-0.45.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: wheel\nVersion: 0.45.1\n")
            wheel.writestr(
                "wheel-0.45.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            )
            wheel.writestr("wheel-0.45.1.dist-info/RECORD", "")
    return folder


def test_the_check_resolves_every_requirement_from_the_folder_alone(fake_wheelhouse, tmp_path, capsys):
    arguments = ["--dest", str(fake_wheelhouse), "--check", "--extras", "deepspeed", "--python-version", "3.11"]
    assert wheelhouse.main(arguments) == 0, capsys.readouterr().err
    assert "resolve from the folder alone for Python 3.11 on manylinux_2_28_x86_64" in capsys.readouterr().out
    # Without DeepSpeed's own requirement (hjson), or without what the editable install builds with, it fails
    for missing in ("hjson", "setuptools"):
        incomplete = tmp_path / missing
        incomplete.mkdir()
        for wheel in fake_wheelhouse.glob("*.whl"):
            if not wheel.name.startswith(f"{missing}-"):
                (incomplete / wheel.name).symlink_to(wheel)
        arguments[1] = str(incomplete)
        assert wheelhouse.main(arguments) == 1
        error = capsys.readouterr().err
        assert "from the folder" in error and f"satisfies the requirement {missing}" in error, error


def test_make_install_with_a_wheelhouse_uses_no_index():
    """Every pip call of `make install` reads these: the folder, and no index."""
    probe = "probe: ; @echo $$PIP_NO_INDEX $$PIP_FIND_LINKS"
    command = ["make", "-s", "--no-print-directory", "-C", str(ROOT), "--eval", probe, "probe"]
    offline = subprocess.run([*command, "WHEELHOUSE=wheelhouse /opt/cuda-torch"], capture_output=True, text=True)
    assert offline.stdout.split() == ["1", str(ROOT / "wheelhouse"), "/opt/cuda-torch"]
    online = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert online.stdout.strip() == ""
