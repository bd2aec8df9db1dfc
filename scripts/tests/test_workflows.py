"""The CI/CD workflow is well-formed (actionlint, its shell steps through shellcheck) and the
project's shell scripts pass shellcheck. actionlint is built from the Go module proxy."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ACTIONLINT = "v1.7.12"


@pytest.fixture(scope="module")
def actionlint(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = Path(os.environ.get("LEADSCORE_CACHE", Path.home() / ".cache" / "leadscore")) / "bin" / ACTIONLINT
    binary = cache / "actionlint"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOBIN": str(cache), "GOTOOLCHAIN": "local"}
        subprocess.run(["go", "install", f"github.com/rhysd/actionlint/cmd/actionlint@{ACTIONLINT}"],
                       env=env, check=True, cwd=tmp_path_factory.mktemp("go"))
    return str(binary)


@pytest.fixture(scope="module")
def shellcheck() -> str:
    path = shutil.which("shellcheck")
    assert path, "shellcheck (Debian package, installed by deploy/local/stack install)"
    return path


def test_the_workflows_pass_actionlint_with_shellcheck(actionlint: str, shellcheck: str) -> None:
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert workflows, "a CI/CD workflow"
    out = subprocess.run([actionlint, f"-shellcheck={shellcheck}", *map(str, workflows)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_workflow_has_every_stage(actionlint: str) -> None:
    text = (REPO / ".github" / "workflows" / "ci.yml").read_text()
    for job in ("lint:", "test:", "chart:", "image:", "deploy-staging:", "model-rollout:"):
        assert f"\n  {job}" in text, job
    assert ".ci/run" in text and "scripts/rollout.sh" in text and "--atomic" in text


def test_actionlint_finds_a_broken_workflow(actionlint: str, shellcheck: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ github.nope }}\n      - run: cd $UNQUOTED && ls\n")
    out = subprocess.run([actionlint, f"-shellcheck={shellcheck}", str(bad)], capture_output=True, text=True, check=False)
    assert out.returncode == 1 and "nope" in out.stdout and "SC2086" in out.stdout, out.stdout


def test_the_shell_scripts_pass_shellcheck(shellcheck: str) -> None:
    scripts = [*sorted((REPO / "scripts").glob("*.sh")), REPO / "deploy" / "local" / "stack", REPO / ".ci" / "run",
               REPO / "deploy" / "image" / "build.sh"]
    out = subprocess.run([shellcheck, "-S", "warning", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout
