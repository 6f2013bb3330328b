"""`make wheelhouse`: every wheel safekey-trl needs beyond a CUDA PyTorch, in one folder, for an offline GPU machine.

On a machine that reaches PyPI, for a target Python and platform:

1. builds the requirements PyPI has only as source into wheels here (DeepSpeed: `pip wheel --no-build-isolation
   --no-deps`, against the PyTorch installed here; its kernels are compiled on first use, so the wheel is pure Python);
2. resolves the package's requirements, the chosen extras and its build requirements (setuptools and wheel, for the
   editable install) for the target with `pip install --dry-run --only-binary=:all: --python-version --platform`,
   standing a placeholder in for PyTorch, so that neither PyTorch nor what only PyTorch needs (its CUDA libraries,
   triton, sympy...) is fetched: the GPU machine's own CUDA build provides them;
3. downloads those wheels (`pip download --no-deps`) into the folder;
4. checks that the folder alone resolves every requirement (`--no-index --find-links`, no pip configuration), and
   prints its size.

`--installed FILE` names what the target has already (`pip freeze` there, or names alone): a distribution it has at
a version every requirement allows is left out (a CUDA image with numpy, pandas and pyarrow needs about 68 MB, most
of it bitsandbytes; a bare Python, about 170 MB, a third of it pyarrow). The build requirements always ship: an
isolated build sees none of the target's packages.

Then, on the GPU machine, `make install WHEELHOUSE=wheelhouse EXTRAS=...` installs from the folder with no index.
Only the standard library and pip are used, so the script runs before anything else is installed; building DeepSpeed
needs PyTorch (`make wheelhouse` runs it in the project's virtual environment).

    python scripts/wheelhouse.py --dest wheelhouse --python-version 3.11 --platform manylinux_2_28_x86_64
    python scripts/wheelhouse.py --dest wheelhouse --check   # only step 4, offline
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# PyPI has these only as source distributions: built into wheels here
BUILT_FROM_SOURCE = ("deepspeed",)
# The local version the placeholder carries: it satisfies `torch>=x` and `torch==x` pins and matches no real wheel
PLACEHOLDER_LABEL = "wheelhouse.placeholder"
DEFAULT_EXTRAS = ("deepspeed",)
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
# In the folder: what the target was said to have and so was left out (`name==version`), for `--check`
ON_TARGET_FILE = "on-target.txt"  # glibc 2.28 and newer, as PyTorch's CUDA wheels need


@dataclass(frozen=True)
class Distribution:
    """One distribution of a resolution: its name (normalised), version, where pip found it, and its requirements."""

    name: str
    version: str
    url: str
    requires: tuple[str, ...] = ()


class WheelhouseError(RuntimeError):
    """A step failed: the message says which, and what pip said."""


@dataclass(frozen=True)
class Target:
    """The machine the wheels are for: its Python (`3.11`) and its platform (`manylinux_2_28_x86_64`)."""

    python_version: str
    platform: str

    def pip_options(self) -> list[str]:
        options = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python_version]
        for tag in platform_tags(self.platform):
            options += ["--platform", tag]
        return options


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def platform_tags(platform: str) -> list[str]:
    """A `manylinux_2_X_<arch>` platform and every older manylinux it runs (pip takes the one tag literally, so a
    `manylinux_2_17` wheel would not count for `manylinux_2_28` without this), with the legacy aliases."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    aliases = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{alias}_{arch}" for minor, alias in aliases.items() if minor <= glibc]
    return tags


def project_requirements(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The package's requirements, those of `extras`, and its build requirements (the editable install builds it)."""
    project = tomllib.loads(pyproject.read_text())
    optional = project["project"].get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise WheelhouseError(f"{pyproject}: no extra named {', '.join(unknown)} (there are {', '.join(optional)})")
    requirements = list(project["project"]["dependencies"])
    for extra in extras:
        requirements += optional[extra]
    return requirements + build_requirements(pyproject)


def build_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What building the package needs (setuptools, wheel): an editable install builds it in an isolated
    environment, which sees none of the target's packages, so these always ship."""
    return list(tomllib.loads(pyproject.read_text())["build-system"]["requires"])


def write_placeholder_wheel(folder: Path, name: str, version: str) -> Path:
    """An empty wheel of `name` at `version`+placeholder, with no requirements: what stands in for PyTorch (and for
    what the target has already)."""
    version = f"{version}+{PLACEHOLDER_LABEL}"
    name = normalize(name).replace("-", "_")
    dist_info = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(
            f"{dist_info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: safekey-trl\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def _pip(arguments: list[str], what: str, isolated: bool = False) -> str:
    """Run pip; `isolated`: without any configuration file or PIP_* variable (their extra indexes and find-links
    folders), so that an offline resolution sees the named folders and nothing else."""
    command = [sys.executable, "-m", "pip", *arguments]
    environment = None
    if isolated:
        environment = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
        environment["PIP_CONFIG_FILE"] = os.devnull
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        said = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
        raise WheelhouseError(f"{what} failed: {' '.join(command)}\n{said}")
    return completed.stdout


def resolve(
    requirements: list[str],
    target: Target,
    given: dict[str, str],
    find_links: list[Path],
    offline: bool = False,
) -> list[Distribution]:
    """The distributions pip would install for `requirements` on `target`, those in `given` (name -> version: PyTorch,
    and what the target has already) standing in as placeholders. `offline`: from the `find_links` folders alone."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pins = []
        for name, version in given.items():
            placeholder = write_placeholder_wheel(work, name, version.split("+")[0])
            pins.append(f"{name}=={placeholder.name.split('-')[1]}")
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        report = work / "report.json"
        arguments = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
        arguments += [*target.pip_options(), "--target", str(work / "target"), "--constraint", str(constraints)]
        if offline:
            arguments.append("--no-index")
        for folder in [*find_links, work]:
            arguments += ["--find-links", str(folder)]
        source = f"the folder {', '.join(map(str, find_links))} alone" if offline else "the index"
        what = f"resolving for Python {target.python_version} on {target.platform} from {source}"
        _pip([*arguments, *requirements], what, isolated=offline)
        installs = json.loads(report.read_text())["install"]
    return [
        Distribution(
            normalize(item["metadata"]["name"]),
            item["metadata"]["version"],
            item["download_info"]["url"],
            tuple(item["metadata"].get("requires_dist", ())),
        )
        for item in installs
        if normalize(item["metadata"]["name"]) not in given
    ]


def read_installed(path: Path) -> dict[str, str | None]:
    """What the target has already, from `pip freeze` output (`name==version`) or a list of names (trusted to do):
    name -> version, or None."""
    installed: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        installed[requirement_name(name)] = version.strip() or None
    return installed


def _marker_environment(target: Target) -> dict[str, str]:
    """The environment markers of the target: its Python and, for a manylinux platform, its machine."""
    from pip._vendor.packaging.markers import default_environment

    environment = default_environment()
    environment.update(python_version=target.python_version, python_full_version=f"{target.python_version}.0")
    machine = re.fullmatch(r"manylinux_\d+_\d+_(\w+)", target.platform)
    if machine:
        environment.update(platform_machine=machine.group(1), sys_platform="linux", platform_system="Linux")
    return environment


def already_installed(
    distributions: list[Distribution],
    installed: dict[str, str | None],
    requirements: list[str],
    target: Target,
    keep: tuple[str, ...] = (),
) -> list[Distribution]:
    """The distributions the target need not get: those it has at a version every requirement on them allows (or
    has at a version the list leaves unsaid: trusted). `keep` names the ones to ship all the same (the build
    requirements: an isolated build sees none of the target's packages)."""
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

    environment = _marker_environment(target)
    by_name = {d.name: d for d in distributions}
    # Every requirement that applies on the target, with the extras asked of each distribution, to a fixed point
    applying: list[Requirement] = []
    extras: dict[str, set[str]] = {}
    pending = [(Requirement(r), "") for r in requirements]
    seen: set[tuple[str, str]] = set()
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        applying.append(requirement)
        name = requirement_name(requirement.name)
        for wanted in ["", *requirement.extras]:
            if (name, wanted) in seen or name not in by_name:
                continue
            seen.add((name, wanted))
            extras.setdefault(name, set()).add(wanted)
            pending += [(Requirement(r), wanted) for r in by_name[name].requires]
    skipped = []
    for distribution in distributions:
        if distribution.name not in installed or distribution.name in keep:
            continue
        version = installed[distribution.name]
        if version is None:
            skipped.append(distribution)
            continue
        try:
            parsed = Version(version)
        except InvalidVersion:
            continue
        specifiers = [r.specifier for r in applying if requirement_name(r.name) == distribution.name]
        if all(specifier.contains(parsed, prereleases=True) for specifier in specifiers):
            skipped.append(distribution)
    return skipped


def build_from_source(requirements: list[str], dest: Path) -> list[Path]:
    """Wheels for the requirements PyPI has only as source (`BUILT_FROM_SOURCE`), built here against the installed
    PyTorch without build isolation (their builds import it)."""
    built = []
    for requirement in requirements:
        if requirement_name(requirement) in BUILT_FROM_SOURCE:
            before = set(dest.glob("*.whl"))
            _pip(
                ["wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", str(dest), requirement],
                f"building {requirement} into a wheel (it needs PyTorch installed here)",
            )
            built += sorted(set(dest.glob("*.whl")) - before) or sorted(
                dest.glob(f"{requirement_name(requirement)}-*")
            )
    for wheel in built:
        if not wheel.name.endswith("-py3-none-any.whl"):
            raise WheelhouseError(f"{wheel.name} was built for this machine only; a pure-Python wheel was expected")
    return built


def download(distributions: list[Distribution], target: Target, dest: Path) -> None:
    """The wheels of `distributions` into `dest`, but for those that lie there already (the ones built here)."""
    here = dest.resolve().as_uri() + "/"
    pins = [f"{d.name}=={d.version}" for d in distributions if not d.url.startswith(here)]
    if pins:
        _pip(["download", "--no-deps", "--quiet", *target.pip_options(), "--dest", str(dest), *pins], "downloading")


def summary(dest: Path, largest: int = 5) -> str:
    """The folder's size in MB, and its largest wheels."""
    wheels = sorted(dest.glob("*.whl"), key=lambda path: path.stat().st_size, reverse=True)
    total = sum(path.stat().st_size for path in wheels) / 1e6
    biggest = ", ".join(f"{path.name.split('-')[0]} {path.stat().st_size / 1e6:.1f}" for path in wheels[:largest])
    return f"{len(wheels)} wheels, {total:.1f} MB in {dest} (largest, MB: {biggest})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / "wheelhouse", help="the folder (created if missing)")
    parser.add_argument(
        "--python-version",
        default=f"{sys.version_info.major}.{sys.version_info.minor}",
        help="the GPU machine's Python, e.g. 3.11 (default: this one's)",
    )
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help=f"its platform tag (default {DEFAULT_PLATFORM})")
    parser.add_argument(
        "--extras", default=",".join(DEFAULT_EXTRAS), help="the package's extras to include, comma-separated"
    )
    parser.add_argument("--torch", default="2.13.0", help="the PyTorch version the GPU machine has (not downloaded)")
    parser.add_argument(
        "--installed",
        type=Path,
        help="what the target has already: `pip freeze` output, or names alone (trusted); those it has at a version "
        "every requirement allows are left out, and then the check resolves against them too",
    )
    parser.add_argument("--check", action="store_true", help="only check, offline, that the folder is complete")
    args = parser.parse_args(argv)
    target = Target(args.python_version, args.platform)
    extras = [extra for extra in args.extras.split(",") if extra.strip()]
    given = {"torch": args.torch}
    on_target = args.dest / ON_TARGET_FILE
    try:
        requirements = project_requirements(extras)
        args.dest.mkdir(parents=True, exist_ok=True)
        if not args.check:
            for wheel in build_from_source(requirements, args.dest):
                print(f"built {wheel.name}")
            distributions = resolve(requirements, target, given, [args.dest])
            installed = read_installed(args.installed) if args.installed else {}
            keep = tuple(requirement_name(r) for r in build_requirements())
            skipped = already_installed(distributions, installed, requirements, target, keep)
            download([d for d in distributions if d not in skipped], target, args.dest)
            # What the target has and the folder lacks, for the check (here and with --check later)
            lines = [f"{d.name}=={installed.get(d.name) or d.version}" for d in skipped]
            on_target.write_text("".join(f"{line}\n" for line in lines))
            if skipped:
                print(f"left out, the target has them: {', '.join(lines)}")
        if on_target.is_file():
            given.update({name: version for name, version in read_installed(on_target).items() if version})
        found = resolve(requirements, target, given, [args.dest], offline=True)
    except WheelhouseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    where = f"Python {target.python_version} on {target.platform}"
    print(f"{len(found)} requirements resolve from the folder alone for {where}")
    print(summary(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
