"""Not per module: it builds and installs the whole package.

A built wheel carries the embedded default model: installed into a fresh venv, `mgtq` works from any folder
and writes its outputs there, not into site-packages (issue 23 item 6)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "mgtq", "recipes", "checkpoints/tiny-shapes",
           "checkpoints/tiny-shapes-16x16"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (ROOT / "checkpoints/tiny-shapes/model_index.json").is_file(),
                                 reason="checkpoints/tiny-shapes is not in this checkout")]


def run(argv, cwd, timeout=600):
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A --system-site-packages venv (torch & co. without downloads) with the wheel installed, built offline."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info beside the sources
        src, dst = ROOT / name, source / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
    shutil.rmtree(source / "mgtq" / "_embedded", ignore_errors=True)
    stale = source / "build" / "lib" / "mgtq"  # what an earlier build of a checkout left: never shipped again
    (stale / "_embedded" / "tiny-shapes").mkdir(parents=True)
    (stale / "removed_since.py").write_text("")
    (stale / "_embedded" / "tiny-shapes" / "removed_since.json").write_text("{}")
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", root / "dist"], cwd=source)
    wheel = next((root / "dist").glob("mgtq-*.whl"))
    run([sys.executable, "-m", "venv", "--system-site-packages", root / "venv"], cwd=root)
    bin_dir = root / "venv" / "bin"
    run([bin_dir / "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    return bin_dir


def test_installed_wheel_generates_from_any_folder(venv, tmp_path):
    where = run([venv / "python", "-c", "import mgtq.default_model as d; print(d.default_model())"], cwd=tmp_path)
    assert "site-packages" in where and str(ROOT) not in where  # the wheel's own copy, not this checkout's
    run([venv / "mgtq", "generate", "--prompt", "a red circle", "--steps", "2", "--no-progress"], cwd=tmp_path)
    assert (tmp_path / "mgtq-out.png").is_file()


def test_installed_wheel_evaluates_and_finds_its_recipe(venv, tmp_path):
    out = run([venv / "mgtq", "eval", "--limit", "2", "--steps", "2", "--no-progress"], cwd=tmp_path)
    assert out.startswith("ShapeBench overall=")
    recipe = run([venv / "python", "-c", "from mgtq.default_model import DEFAULT_RECIPE as r; "
                  "from mgtq.scq.recipe import load_recipe; load_recipe(r); print(r)"], cwd=tmp_path)
    assert "site-packages" in recipe
    named = run([venv / "python", "-c", "from mgtq.default_model import recipe_file as f; "
                 "print(f('meissonic-1024-w4a8-scq')); print(f('tiny-shapes-16x16-w4a8-scq'))"], cwd=tmp_path)
    assert named.count("site-packages") == 2  # every shipped recipe, by name, from the wheel


def test_installed_wheel_carries_the_second_embedded_model_by_name(venv, tmp_path):
    out = run([venv / "mgtq", "eval", "--model", "tiny-shapes-16x16", "--limit", "2", "--steps", "2", "--no-progress"],
              cwd=tmp_path)
    assert out.startswith("ShapeBench overall=")
    where = run([venv / "python", "-c", "from pathlib import Path; import mgtq.default_model as d, mgtq.scq.calibrate as c; "
                 "from mgtq.scq.recipe import load_recipe; "
                 "r = load_recipe(Path(d.DEFAULT_RECIPE).parent / 'tiny-shapes-16x16-w4a8-scq.yaml'); "
                 "print(c.resolve_model(r))"], cwd=tmp_path)
    assert "site-packages" in where and where.strip().endswith("tiny-shapes-16x16")


def test_installed_wheel_benches_memory_and_latency_without_the_lab(venv, tmp_path):
    """The harness is in the wheel (one process per case, outputs in the working folder); the lab is not."""
    run([venv / "mgtq", "bench", "--formats", "bf16,scq", "--repeats", "2", "--warmup", "0", "--steps", "1",
         "--threads", "1", "--no-progress"], cwd=tmp_path)
    report = json.loads((tmp_path / "bench_tiny-shapes.json").read_text())
    assert [r["status"] for r in report["results"]] == ["ok", "ok"] and (tmp_path / "bench_tiny-shapes.md").is_file()
    assert all(r["latency"]["forward"]["rounds"] == [0, 1] for r in report["results"])  # interleaved rounds
    assert report["baseline"]["rss"] > 0
    for flag in ("--peers", "--profile", "--plot"):  # refused at once, before any case runs
        done = subprocess.run([venv / "mgtq", "bench", flag, "--json", tmp_path / "lab.json"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "needs a checkout" in done.stderr, (flag, done.stderr[-500:])
        assert not (tmp_path / "lab.json").exists()


def test_the_wheel_ships_the_package_without_test_fixtures_the_benchmark_lab_or_stale_build_files(venv):
    import zipfile

    wheel = next((venv.parent.parent / "dist").glob("mgtq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mgtq/cli.py" in names and "mgtq/bench/runner.py" in names  # the package and its bench harness
    shipped = [n for n in names if n.split("/")[0] in ("tests", "benchmarks") or "removed_since" in n
               or n.endswith(("testkit.py", "conftest.py"))]
    assert not shipped, shipped
