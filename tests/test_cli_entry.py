"""The ``opensora-duca`` entry point (:mod:`opensora_duca.cli.main`): the commands it lists are
the tools, a missing or unknown command is one line and exit 2, and a wheel built from the tree
installs into a fresh virtual environment whose ``opensora-duca demo`` runs from another
directory on the packaged demo config and model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from opensora_duca.cli import main as cli_main
from opensora_duca.cli.main import packaged_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_commands_are_the_tools():
    tools = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "tools")) if n.endswith(".py"))
    assert sorted(mod for mod, _ in cli_main.COMMANDS.values()) == tools
    for name, (mod, _) in cli_main.COMMANDS.items():
        assert name == mod.replace("_", "-")
        assert os.path.isfile(os.path.join(ROOT, "opensora_duca", "cli", mod + ".py"))
        text = open(os.path.join(ROOT, "tools", mod + ".py"), encoding="utf-8").read()
        assert "from opensora_duca.cli.main import run_tool" in text
        assert f'sys.exit(run_tool("{mod}"' in text


def test_help_lists_every_command(capsys):
    assert cli_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: opensora-duca ")
    for name in cli_main.COMMANDS:
        assert f"\n  {name} " in out


@pytest.mark.parametrize("argv,word", [(["bogus"], "unknown command 'bogus'"),
                                       ([], "no command given")])
def test_bad_command_is_one_line_and_exit_2(argv, word):
    r = subprocess.run([sys.executable, "-m", "opensora_duca", *argv], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and word in r.stderr and "vbench-evaluate" in r.stderr
    assert r.stderr.startswith("python -m opensora_duca: error: ")


def test_command_gets_its_arguments_and_exit_status(tmp_path, capsys):
    # fidelity's own check: a missing folder is exit 2 before any work
    assert cli_main.main(["fidelity", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "directory does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the command's own argparse, under its prog name
        cli_main.main(["demo", "--bogus-flag"])
    assert e.value.code == 2
    assert "usage: opensora-duca demo " in capsys.readouterr().err


def test_demo_defaults_to_the_packaged_config():
    demo = packaged_config("demo")
    assert cli_main._demo_args([]) == [demo]
    assert cli_main._demo_args(["--seed", "1"]) == [demo, "--seed", "1"]
    assert cli_main._demo_args(["my.py", "--seed", "1"]) == ["my.py", "--seed", "1"]
    assert cli_main._demo_args(["--help"]) == ["--help"]


def test_packaged_demo_config_is_the_repository_one():
    """The packaged copy must stay byte-equal to configs/demo/inference.py (copy it over after
    editing that file)."""
    with open(os.path.join(ROOT, "configs", "demo", "inference.py"), "rb") as f:
        repo = f.read()
    with open(packaged_config("demo"), "rb") as f:
        assert f.read() == repo


def _copy_source(dst):
    """The files a wheel is built from (setup.py, README.md, the package), without caches, so
    the build writes nothing into the working tree."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    os.makedirs(dst)
    for name in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy2(os.path.join(ROOT, name), dst)
    shutil.copytree(os.path.join(ROOT, "opensora_duca"), os.path.join(dst, "opensora_duca"),
                    ignore=skip)


def test_wheel_installs_and_demo_runs_from_elsewhere(tmp_path):
    src, wheels, venv, work = (tmp_path / n for n in ("src", "wheels", "venv", "work"))
    _copy_source(src)
    run = dict(capture_output=True, text=True, env=_env(), timeout=120)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(wheels), str(src)], **run)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = [str(p) for p in wheels.glob("opensora_duca-*.whl")]

    # a fresh venv; torch & co. come from this interpreter's site-packages through a .pth line
    # (a path line: the editable install's .pth files there are not processed)
    r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                        str(venv)], **run)
    assert r.returncode == 0, r.stderr
    vpy = str(venv / "bin" / "python")
    site = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          **run).stdout.strip()
    with open(os.path.join(site, "_parent_env.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", vpy, "install", "--no-deps",
                        "-q", wheel], **run)
    assert r.returncode == 0, r.stderr[-2000:]

    os.makedirs(work)
    exe = str(venv / "bin" / "opensora-duca")
    run.update(cwd=str(work))
    r = subprocess.run([exe, "--help"], **run)
    assert r.returncode == 0 and "vbench-evaluate" in r.stdout, r.stderr
    r = subprocess.run([exe, "bogus"], **run)
    assert r.returncode == 2 and r.stderr.startswith("opensora-duca: error: unknown command")

    r = subprocess.run([exe, "demo", "--num-sampling-steps", "3", "--prompt",
                        "a red circle moving left", "--save-dir", "out"], **run)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    # the packaged config of the installed wheel, not the working tree's
    assert summary["config"].startswith(site) and summary["config"].endswith(
        "opensora_duca/assets/demo_inference.py")
    assert [r["run"] for r in summary["runs"]] == ["uncached", "DuCa", "FORA+forecast"]
    for row in summary["runs"]:
        assert len(row["files"]) == 1 and os.path.getsize(work / row["files"][0]) > 0
    assert summary["runs"][0]["psnr"] == 100.0


def test_pop_log_level():
    assert cli_main.pop_log_level(["a", "--log-level", "info", "--x"]) == ("INFO", ["a", "--x"])
    assert cli_main.pop_log_level(["--log-level=DEBUG"]) == ("DEBUG", [])
    assert cli_main.pop_log_level(["a"]) == (None, ["a"])
    with pytest.raises(ValueError, match="needs a level"):
        cli_main.pop_log_level(["a", "--log-level"])
    with pytest.raises(ValueError, match="'LOUD' is not accepted"):
        cli_main.pop_log_level(["--log-level", "LOUD"])


def test_tool_bad_log_level_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fidelity.py"),
                        "--log-level", "LOUD", str(tmp_path), str(tmp_path)],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("fidelity.py: error: --log-level 'LOUD' is not accepted; accepted: one "
                        "of DEBUG, INFO, WARNING, ERROR, CRITICAL\n")


def test_log_level_shows_the_library_messages(tmp_path):
    """Without --log-level an INFO record of the library is not shown (Python's default); after
    a tool ran with --log-level INFO it is, on stderr."""
    code = ("import logging, sys\n"
            "from opensora_duca.cli.main import run_tool\n"
            "log = logging.getLogger('opensora_duca.cache')\n"
            "log.info('before')\n"
            f"rc = run_tool('fidelity', ['--log-level', 'INFO', {str(tmp_path / 'a')!r}, "
            f"{str(tmp_path / 'b')!r}])\n"
            "log.info('after'); log.debug('hidden')\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       cwd=str(tmp_path), timeout=60)
    assert r.returncode == 2  # fidelity's own check of its folders, after the flag was taken
    assert "directory does not exist" in r.stderr
    assert "INFO opensora_duca.cache: after" in r.stderr
    assert "before" not in r.stderr and "hidden" not in r.stderr


def test_tool_help_lists_log_level():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fidelity.py"), "--help"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "--lpips" in r.stdout and "--log-level LEVEL" in r.stdout
