"""Two installs: ``pip install thallus`` is the layers alone, ``thallus[server]`` adds the service.

* the import boundary: the layers' modules never import the service's (read from their source),
  and importing every layer module loads none of the service's dependencies (in a fresh process);
* the wheel, built from this tree and installed without extras in a fresh venv: at most 12
  packages besides thallus and 20 MB installed, the ``thallus`` command says what it needs (exit
  2), and the README's library example serves protected responses once its framework is added;
* the wheel with ``[server]`` in another fresh venv runs ``thallus serve``.

The wheel tests install from the package index pip is configured with (they need it: a fresh venv
has nothing); they take a minute or two.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from tests.server import free_port, serving
from thallus.cli import SERVER_MODULES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "thallus"
README = ROOT / "README.md"

#: What only the extras bring (the server's, the scanner's, the metrics'); none of it may load with
#: the layers. The server's list is the one the ``thallus`` entry point names when it is missing, but
#: uuid-utils: the layers use it when it is there (the speedups extra).
SERVICE_MODULES = tuple(sorted((SERVER_MODULES - {"uuid_utils"}) | {"httpx", "prometheus_client"}))
MAX_PACKAGES = 12
MAX_INSTALLED_BYTES = 20 * 1024 * 1024


def layer_modules() -> list[str]:
    """Every module of the package outside ``thallus.server`` (``integrations`` import their framework)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[1:2] in (["server"], ["integrations"]):
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_layers_never_import_the_service() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("server", "integrations") or relative.name == "cli.py":
            continue  # the top-level cli imports thallus.server.cli lazily, to say what is missing
        service = sorted(name for name in imported_names(path) if name.startswith("thallus.server"))
        if service:
            offenders[str(relative)] = service
    assert offenders == {}


def test_importing_every_layer_loads_none_of_the_services_dependencies() -> None:
    modules = layer_modules()
    assert "thallus.stack" in modules and "thallus.settings" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    )
    assert [name for name in loaded if name.split(".")[0] in SERVICE_MODULES or name.startswith("thallus.server")] == []


# -- the wheel in fresh venvs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    [built] = out.glob("thallus-*.whl")
    return built


def fresh_venv(directory: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    return directory / "bin" / "python"


def pip(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args], check=True, timeout=900
    )


def installed(python: Path) -> list[dict[str, str]]:
    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [package for package in json.loads(listing.stdout) if package["name"].lower() not in ("pip", "setuptools")]


def site_packages_bytes(python: Path) -> int:
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    total = 0
    for path in Path(site).rglob("*"):
        top = path.relative_to(site).parts[0]
        if path.is_file() and not top.startswith(("pip", "setuptools", "_distutils_hack", "distutils-precedence")):
            total += path.stat().st_size
    return total


def readme_library_example() -> str:
    """The first Python block of the README's "Use it as a library" section."""
    section = README.read_text().split("## Use it as a library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's library section has no python example"
    return match.group(1)


def test_the_wheel_alone_is_the_lean_library(wheel: Path, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "venv")
    pip(python, str(wheel))
    packages = installed(python)
    others = sorted(package["name"] for package in packages if package["name"].lower() != "thallus")
    size = site_packages_bytes(python)
    print(f"pip install thallus: {len(others)} packages besides thallus ({', '.join(others)}), {size / 2**20:.1f} MB")
    assert len(others) <= MAX_PACKAGES, others
    assert size <= MAX_INSTALLED_BYTES, f"{size / 2**20:.1f} MB installed"
    for name in SERVICE_MODULES:
        assert name.replace("_", "-") not in [other.lower() for other in others], name

    thallus = python.parent / "thallus"
    missing = subprocess.run([str(thallus), "serve"], check=False, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert 'pip install "thallus[server]"' in missing.stderr, missing.stderr
    version = subprocess.run([str(thallus), "--version"], check=False, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr

    # The README's example, with the framework it imports, served by uvicorn.
    pip(python, "fastapi", "uvicorn")
    (tmp_path / "main.py").write_text(readme_library_example())
    port = free_port()
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "THALLUS_ENV_FILE": ""}
    command = [str(python), "-m", "uvicorn", "main:app", "--port", str(port)]
    for url in serving(command, tmp_path, f"http://127.0.0.1:{port}/items", environment):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"]
        assert response.headers["x-correlation-id"]
        refused = httpx.post(url, headers={"Origin": "https://evil.example", "Cookie": "session=1"}, timeout=10)
        assert refused.status_code == 403
        assert refused.json()["error"] == "CSRFError"


def test_the_wheel_with_the_server_extra_serves(wheel: Path, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "venv")
    pip(python, f"{wheel}[server]")
    port = free_port()
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "THALLUS_DATA_DIR": str(tmp_path / "data"),
        "THALLUS_ENV_FILE": "",
    }
    command = [str(python.parent / "thallus"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    for url in serving(command, tmp_path, f"http://127.0.0.1:{port}/health", environment):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-correlation-id"]
