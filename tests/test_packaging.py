"""The install paths agree: pyproject.toml, environment.yml, the Makefile and CI."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _split(req):
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def _pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return dict(_split(r) for r in reqs)


def _environment_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    reqs, pip = {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        elif dep != "pip" and not dep.startswith("python"):
            name, spec = _split(dep)
            reqs[CONDA_NAMES.get(name, name)] = spec
    for dep in pip:
        if dep.startswith("-e"):
            continue
        name, spec = _split(dep)
        reqs[name] = spec
    return reqs, pip


def test_environment_yml_has_the_same_requirements_as_pyproject():
    env, _ = _environment_requirements()
    assert env == _pyproject_requirements()


def test_environment_yml_installs_the_package_itself():
    _, pip = _environment_requirements()
    assert "-e ." in pip


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\b", ci, re.M)


def test_torch_lower_bound_admits_the_gpu_machines_torch():
    # The lent GPU machines and Colab bring their own torch (2.11 there): keep the bound below.
    spec = _pyproject_requirements()["torch"]
    major, minor = map(int, re.match(r">=(\d+)\.(\d+)", spec).groups())
    assert (major, minor) <= (2, 11)


def test_the_kernel_source_ships_in_the_package():
    """bnlib/kernels/cpu.py compiles bnlib/kernels/*.cpp on the user's machine, so an installed
    (non-editable) bnlib must carry those files: pyproject's package-data must match them."""
    import fnmatch
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["bnlib"]
    sources = [p.relative_to(ROOT / "bnlib").as_posix() for p in (ROOT / "bnlib").rglob("*.cpp")]
    assert sources and all(any(fnmatch.fnmatch(s, g) for g in globs) for s in sources), sources
