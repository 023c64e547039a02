"""The front door: every command answers --help without TensorFlow, errors are one line,
stdout holds one JSON summary, and the packages import each other in one direction."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from delf_tf.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_every_command_answers_help_without_tensorflow():
    code = f"""
import contextlib, io, json, sys
from delf_tf.cli import main
out = {{}}
for name in {sorted(COMMANDS)!r}:
    for flag in ("--help", "-h"):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            status = main(["delf", name, flag])
        out[name + " " + flag] = [status, buffer.getvalue()]
out["modules"] = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
print(json.dumps(out))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert answers.pop("modules") == []  # help never imports TensorFlow
    assert len(answers) == 2 * len(COMMANDS)
    for key, (status, text) in answers.items():
        assert status == 0, key
        name = key.split(" ")[0]
        assert text.startswith(f"delf {name}: "), key
        assert "--flagfile" in text, key
    # Help texts carry the real defaults, read from the config dataclasses.
    assert "(default 1000)" in answers["extract --help"][1]


@pytest.mark.parametrize(
    "script, flag", [("training/train.py", "--stage"), ("export/export_model.py", "--export_base")]
)
def test_thin_mains_list_their_flags(script, flag):
    done = subprocess.run(
        [sys.executable, str(REPO / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout


def test_user_errors_are_one_line_with_exit_status_1(tmp_path, capsys):
    model = tmp_path / "x.keras"  # exists: input paths are checked first
    model.touch()
    cases = [
        (
            ["fit-pca", f"--features={tmp_path / 'none'}", f"--output_file={tmp_path / 'p.npz'}"],
            "no such file or directory",
        ),
        (
            ["index", f"--features={tmp_path / 'none'}", f"--output_dir={tmp_path / 'i'}"],
            "no such file or directory",
        ),
        (["serve", f"--model_base_path={tmp_path / 'none'}"], "no such directory"),
        (
            ["export", f"--model={model}", "--weights=random", f"--export_base={tmp_path}"],
            "--weights applies only without --model",
        ),
    ]
    for argv, message in cases:
        assert main(["delf", *argv]) == 1, argv
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing on stdout when the command failed
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"delf {argv[0]}: error: ") and message in lines[0]


def test_bad_command_lines_exit_with_status_2(capsys):
    assert main(["delf", "nonsense"]) == 2
    assert main(["delf", "index", "--no_such_flag=1"]) == 2
    assert main(["delf", "index", "--features=a", "--output_dir=b", "stray"]) == 2
    assert main(["delf", "index", "--features=a", "--output_dir=b", "--", "--x=1"]) == 2
    assert main(["delf"]) == 2
    assert "delf index" in capsys.readouterr().err


def _package_imports() -> dict[str, set[str]]:
    """First-level package of delf_tf -> the first-level packages its modules import."""
    root = REPO / "delf_tf"
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        package = path.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "delf_tf" and len(parts) > 1 and parts[1] != package:
                    edges.setdefault(package, set()).add(parts[1])
    return edges


def test_packages_import_each_other_in_one_direction():
    edges = _package_imports()
    assert "features" in edges["extraction"]  # the graph is real: extraction uses features

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(package for package in edges if reaches(package, package, set()))
    assert cycles == []


def test_serving_contract_has_one_home():
    """Signature names and the info asset are spelled in delf_tf/contract.py only."""
    offenders = []
    for path in (REPO / "delf_tf").rglob("*.py"):
        if path.name == "contract.py":
            continue
        text = path.read_text(encoding="utf-8")
        for literal in ('"serving_default"', '"extract_image"', '"extraction_config.json"'):
            if literal in text:
                offenders.append(f"{path.relative_to(REPO)}: {literal}")
    assert offenders == []


STARTUP_CHATTER = ("cuda", "cpu_feature_guard", "onednn", "absl::initializelog", "loading faiss")
# A line in the format of absl's C++ or Python logging: "E0000 00:00:1796399679.190528 2826
# util.cc:131] ..." (native) or "I1204 16:20:42.672392 1400... signature_serialization.py:156] ...".
LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]", re.MULTILINE)


def assert_quiet(stderr: str) -> None:
    """No library start-up chatter and no log-formatted line on stderr."""
    lowered = stderr.lower()
    assert not [marker for marker in STARTUP_CHATTER if marker in lowered], stderr
    assert "logging before flag parsing" not in lowered, stderr
    assert not LOG_LINE.findall(stderr), stderr


def test_commands_start_without_library_chatter(tmp_path, model_config_file, astronaut_small):
    """`delf extract`, `search` (also when it refuses) and `export`, and `import delf_tf.<pkg>`
    in Python, write only their own lines to stderr, also without TF_CPP_MIN_LOG_LEVEL, on
    this CPU and with oneDNN limited to AVX2 (the other kind of machine); DELF_TF_LOGS=1
    lets FAISS's loader speak."""
    from PIL import Image

    Image.fromarray(astronaut_small).save(tmp_path / "a.png")
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TF_CPP_MIN_LOG_LEVEL", "DELF_TF_LOGS", "ONEDNN_MAX_CPU_ISA")
    }

    def run(argv, returncode=0, **extra):
        done = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=240,
            env={**environment, **extra},
        )
        assert done.returncode == returncode, done.stderr
        return done

    def delf(*argv, returncode=0, **extra):
        done = run(["-m", "delf_tf.cli", *argv], returncode=returncode, **extra)
        if returncode == 0:
            json.loads(done.stdout)  # one JSON summary on stdout
        return done.stderr

    model = f"--model_config={model_config_file}"
    for isa in ("", "AVX2"):
        extract = delf(
            "extract",
            f"--images={tmp_path / 'a.png'}",
            f"--output_dir={tmp_path / ('features' + isa)}",
            model,
            "--score_threshold=0",
            "--max_image_size=64",
            ONEDNN_MAX_CPU_ISA=isa,
        )
        assert_quiet(extract)
    index = ["index", f"--features={tmp_path / 'features'}"]
    assert_quiet(delf(*index, f"--output_dir={tmp_path / 'i'}"))
    search = [f"--index={tmp_path / 'i'}", f"--images={tmp_path / 'a.png'}", model]
    assert_quiet(delf("search", *search, "--score_threshold=0"))
    refused = delf("search", *search, "--seed=5", returncode=1)
    assert_quiet(refused)
    assert refused.count("\n") == 1 and refused.startswith("delf search: error:"), refused
    assert_quiet(delf("export", model, f"--export_base={tmp_path / 'models'}"))
    imported = run(["-c", "import delf_tf.extraction.graph, delf_tf.model, keras"])
    assert_quiet(imported.stderr)
    assert imported.stderr == ""
    assert "loading faiss" in delf("search", *search, DELF_TF_LOGS="1").lower()
