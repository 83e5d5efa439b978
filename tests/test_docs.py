"""The documentation matches the code: every relative link and every repository path named in
README.md and docs/*.md exists (a link's #anchor names a heading of its page), every
command-line flag the docs show for a tool (``tools/X.py --flag``, ``opensora-duca X --flag``,
``python -m opensora_duca X --flag``) is accepted by that tool's argparse parser (built without
running the tool), the README's Python example and docs/python.md's run as written on the demo
model, and the pipeline's ``attach_cache`` / ``remove_cache`` that they use work as documented."""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch

from opensora_duca.cli.main import COMMANDS, packaged_config, pop_log_level

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
#: pages the README announces that other work adds later: allowed to be missing until they exist
#: (then they are checked like every other page)
PENDING = {"docs/opensora2.md", "docs/failure-behaviour.md"}
#: folders that runs create (outputs named in the docs), not part of the repository
OUTPUT_DIRS = ("samples/", "outputs/", "vbench_videos", "work_dirs/")
#: files of an Open-Sora checkout that the docs name (upstream's own script)
UPSTREAM_FILES = {"scripts/inference.py", "scripts/diffusion/inference.py",
                  "./ckpts/Open_Sora_v2.safetensors"}


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(rel):
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _strip_code(_read(rel)), re.M)}


def _strip_code(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _code_blocks(text, lang=None):
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
            if lang is None or m.group(1) == lang]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_exist(doc):
    bad = []
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", _strip_code(_read(doc))):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        rel = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if rel in PENDING and not os.path.exists(os.path.join(ROOT, rel)):
            continue
        if not os.path.exists(os.path.join(ROOT, rel)):
            bad.append(f"{target} (no {rel})")
        elif anchor and (not rel.endswith(".md") or anchor not in _anchors(rel)):
            bad.append(f"{target} (no heading #{anchor} in {rel})")
    assert bad == [], f"{doc}: broken links {bad}"


_PATH = re.compile(r"(?<![\w./-])((?:\.\./)?(?:[\w.-]+/)+[\w.-]*\.(?:py|md|json|png|safetensors"
                   r"|txt|sh|toml|cfg))(?![\w/])")


def _named_paths(doc):
    """Paths with a file extension named anywhere in ``doc`` (code included), resolvable
    against the repository root, the page's folder or the package."""
    out = set()
    for m in _PATH.finditer(_read(doc)):
        p = m.group(1)
        if p.startswith(OUTPUT_DIRS) or p in UPSTREAM_FILES or "/path/to/" in p:
            continue
        out.add(p)
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_named_files_exist(doc):
    here = os.path.dirname(doc)
    missing = []
    for p in sorted(_named_paths(doc)):
        cands = [p, os.path.join(here, p), os.path.join("opensora_duca", p)]
        if any(os.path.normpath(c) in PENDING for c in cands):
            continue
        if not any(os.path.exists(os.path.join(ROOT, c)) for c in cands):
            missing.append(p)
    assert missing == [], f"{doc} names files that do not exist: {missing}"


def test_pending_pages_are_announced():
    """A page allowed to be missing is one the README names (drop it from PENDING otherwise)."""
    readme = _read("README.md")
    for p in PENDING:
        assert p in readme


def test_path_check_can_fail():
    assert _named_paths("README.md") >= {"configs/opensora-v1-2/inference/duca.py"}
    assert _PATH.findall("see `tools/nope.py` and docs/x.md") == ["tools/nope.py", "docs/x.md"]


# ------------------------------------------------------------------------ flags of the tools
class _Parser(BaseException):
    """Raised instead of parsing, carrying the parser (a BaseException: no tool catches it)."""


def tool_parser(module):
    """The argparse parser of ``opensora_duca.cli.<module>``, built by its ``main`` and caught
    before it parses anything (nothing of the tool runs)."""
    mod = importlib.import_module(f"opensora_duca.cli.{module}")

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture), \
            mock.patch.object(mod, "keep_freed_host_memory", lambda: None, create=True):
        try:
            mod.main([])
        except _Parser as caught:
            return caught.args[0]
    raise AssertionError(f"opensora_duca.cli.{module}.main built no argparse parser")


_MODULES = {mod: name for name, (mod, _) in COMMANDS.items()}
_CALL = re.compile(r"(?:tools/(\w+)\.py|(?:opensora-duca|-m opensora_duca) ([a-z][a-z-]*))"
                   r"((?:\s+[^\s`|]+)*)")


def _segments(text):
    """Command lines of a page: each line of its code blocks (with \\ continuations joined),
    each inline code span and each table cell of the rest."""
    segs = []
    for block in _code_blocks(text):
        segs += block.replace("\\\n", " ").split("\n")
    rest = _strip_code(text)
    segs += re.findall(r"`([^`]+)`", rest)
    return segs


def documented_calls(docs=DOCS):
    """{(module, flag)}: each flag the docs show after a tool's name, and where."""
    out = {}
    for doc in docs:
        for seg in _segments(_read(doc)):
            for m in _CALL.finditer(seg):
                module = m.group(1) or (COMMANDS[m.group(2)][0] if m.group(2) in COMMANDS
                                        else m.group(2))
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(3)):
                    out.setdefault((module, flag), doc)
    return out


def _common_flag(flag):
    """A flag every tool takes through run_tool (``--log-level``), not its own parser."""
    return pop_log_level([flag, "INFO"])[0] is not None


def test_documented_flags_are_accepted():
    calls = documented_calls()
    assert len({m for m, _ in calls}) >= 8  # the docs show most tools with flags
    unknown = sorted(m for m, _ in calls if m not in _MODULES)
    assert unknown == [], f"the docs name tools that do not exist: {unknown}"
    parsers = {m: tool_parser(m) for m in {m for m, _ in calls}}
    bad = [f"{doc}: {_MODULES[m]} {flag}" for (m, flag), doc in sorted(calls.items())
           if flag not in parsers[m]._option_string_actions and not _common_flag(flag)]
    assert bad == [], f"flags the docs show that the tools do not accept: {bad}"


def test_flag_check_can_fail():
    assert ("inference", "--prompt") in documented_calls()
    assert "--no-such-flag" not in tool_parser("inference")._option_string_actions
    assert _common_flag("--log-level") and not _common_flag("--no-such-flag")
    seg = _segments("run `opensora-duca benchmark --preset cpu --bogus 1`\n")
    assert [m.group(2) for m in _CALL.finditer(seg[0])] == ["benchmark"]


# ------------------------------------------------------------------------- Python examples
def _section(text, heading):
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _run_example(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)


def test_readme_python_example_runs(tmp_path):
    (code,) = _code_blocks(_section(_read("README.md"), "From Python"), "python")
    r = _run_example(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cache policy   : DuCa" in r.stdout and "9 aggressive" in r.stdout
    psnr = float(re.search(r"PSNR vs uncached: ([\d.]+)", r.stdout).group(1))
    assert 20 < psnr < 100  # cached, so close to the uncached video but not equal
    assert (tmp_path / "red_circle_duca.mp4").stat().st_size > 0


def test_model_level_example_runs(tmp_path):
    code = _code_blocks(_read("docs/python.md"), "python")[0]
    r = _run_example(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FLOPs ratio    : 2.51x" in r.stdout and "(2, 3, 8, 32, 32)" in r.stdout.replace(
        "torch.Size([2, 3, 8, 32, 32])", "(2, 3, 8, 32, 32)")


# ---------------------------------------------------------- Pipeline.attach_cache / remove_cache
@pytest.fixture(scope="module")
def pipe():
    from opensora_duca.pipeline import build_from_config
    from opensora_duca.utils.config import load_config
    cfg = load_config(packaged_config("demo"))
    cfg.cache = None
    return build_from_config(cfg, device="cpu")


def _video(pipe):
    return pipe.generate(["a red circle moving left"], seed=3, num_sampling_steps=6)["video"]


def test_attach_and_remove_cache(pipe):
    from opensora_duca.cache import get_cache_manager
    assert pipe.cache_manager is None and get_cache_manager(pipe.model) is None
    base = _video(pipe)
    mgr = pipe.attach_cache(dict(type="DuCa"))
    assert pipe.cache_manager is mgr and get_cache_manager(pipe.model) is mgr
    cached = _video(pipe)
    assert mgr.stats()["flops_ratio"] > 1.0 and not torch.equal(cached, base)
    assert "DuCa" in pipe.report()

    fora = pipe.attach_cache(dict(type="FORA", interval=2))  # replaces the attached one
    assert get_cache_manager(pipe.model) is fora and fora.policy.name == "FORA"
    with pytest.raises(ValueError, match="interval"):  # checked before the model is touched
        pipe.attach_cache(dict(type="FORA", interval=0))
    assert get_cache_manager(pipe.model) is fora and pipe.cache_manager is fora

    pipe.remove_cache()
    assert pipe.cache_manager is None and get_cache_manager(pipe.model) is None
    assert pipe.report() is None
    assert torch.equal(_video(pipe), base)  # exactly the uncached model again
    pipe.remove_cache()  # a no-op without a cache
