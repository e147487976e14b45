"""One vocabulary across ``mist-device`` and ``mist-cloud`` (issue 25): every option's environment variable
follows the documented rule, outputs are named with ``--out``, sizes take one syntax, no command replaces a
file without ``--overwrite``, and ``--help`` opens with what a newcomer needs and points only to what a
wheel install has."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from digits_sets import write_digits_set

from mist.cloud.cli import main as cloud_main
from mist.device.cli import main as device_main
from mist.kit.flags import SEED, Size, parse_bytes
from mist.kit.text import format_bytes

GROUPS = {"mist-device": device_main, "mist-cloud": cloud_main}


def every_option():
    """(program, command name, command, option) for every option of every command of both programs."""
    for prog, group in GROUPS.items():
        for name, command in sorted(group.commands.items()):
            for param in command.params:
                if isinstance(param, click.Option):
                    yield prog, name, command, param


def rule(command: str, flag: str) -> str:
    """The README's rule, written out here independently of the kit: MIST_<COMMAND>_<OPTION>."""
    return "MIST_" + command.upper().replace("-", "_") + "_" + flag[2:].upper().replace("-", "_")


def long_flag(param: click.Option) -> str:
    flags = [o for o in param.opts if o.startswith("--")]
    assert flags, f"{param.name} has no long flag"
    return flags[0]


def context(prog: str, name: str, command: click.Command) -> click.Context:
    parent = click.Context(GROUPS[prog], info_name=prog, auto_envvar_prefix="MIST")
    return click.Context(command, info_name=name, parent=parent, auto_envvar_prefix=f"MIST_{name.upper()}")


def test_every_option_of_every_command_reads_the_documented_variable(monkeypatch) -> None:
    seen = 0
    for prog, name, command, param in every_option():
        wanted = rule(name, long_flag(param))
        ctx = context(prog, name, command)
        monkeypatch.setenv(wanted, "value")
        assert param.resolve_envvar_value(ctx) == "value", f"{prog} {name} {long_flag(param)} ignores ${wanted}"
        monkeypatch.delenv(wanted)
        # click's own name comes from the Python parameter (--out "run_dir" -> MIST_TRAIN_RUN_DIR): never read.
        python_name = f"MIST_{name.upper()}_{param.name.upper()}"
        if python_name != wanted:
            monkeypatch.setenv(python_name, "value")
            assert param.resolve_envvar_value(ctx) is None, f"{prog} {name} reads ${python_name}"
            monkeypatch.delenv(python_name)
        shown = param.get_help_record(ctx)
        assert shown is None or wanted in shown[1], f"{prog} {name} --help does not name ${wanted}"
        seen += 1
    assert seen > 120, seen  # every command of both programs was walked


def test_the_renamed_variables_work_end_to_end(tmp_path: Path) -> None:
    train = write_digits_set(tmp_path / "train", slice(0, 300))
    env = {"MIST_TRAIN_OUT": str(tmp_path / "run"), "MIST_TRAIN_EPOCHS": "1", "MIST_TRAIN_RANK": "4",
           "MIST_TRAIN_HEADS": "2", "MIST_TRAIN_PROGRESS": "none"}
    result = CliRunner().invoke(device_main, ["train", str(train)], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "best.safetensors").exists()
    result = CliRunner().invoke(device_main, ["evaluate", str(tmp_path / "run"), str(train)],
                                env={"MIST_EVALUATE_JSON": "1"})
    assert result.exit_code == 0 and result.output.lstrip().startswith("{"), result.output
    result = CliRunner().invoke(device_main, ["predict", str(tmp_path / "run"), str(train)],
                                env={"MIST_PREDICT_OUT": str(tmp_path / "p.csv")})
    assert result.exit_code == 0 and (tmp_path / "p.csv").read_text().startswith("id,label"), result.output


# ---- outputs and overwriting ---------------------------------------------------------------------------


def test_outputs_are_named_with_out() -> None:
    for prog, name, _command, param in every_option():
        flag = long_flag(param)
        assert flag not in ("--output", "--out-dir", "--output-dir", "--dest"), f"{prog} {name} {flag}: use --out"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocabulary")
    sets = {"train": write_digits_set(root / "train", slice(0, 300)),
            "other": write_digits_set(root / "other", slice(300, 600))}
    result = CliRunner().invoke(device_main, ["train", str(sets["train"]), "--out", str(root / "run"), "--epochs", "1",
                                              "--rank", "4", "--heads", "2", "--progress", "none"])
    assert result.exit_code == 0, result.output
    return {**sets, "run": root / "run", "root": root}


def refused(group: click.Group, args: list[str], target: Path, code: int = 2) -> None:
    before = target.read_bytes() if target.is_file() else sorted(p.name for p in target.iterdir())
    result = CliRunner().invoke(group, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "--overwrite" in result.output.strip().split("\n")[-1], result.output
    after = target.read_bytes() if target.is_file() else sorted(p.name for p in target.iterdir())
    assert after == before, f"{args[0]} changed {target} although it refused"


def test_every_file_writing_command_refuses_to_replace_without_overwrite(made: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"something the user keeps")
    run, train, other = made["run"], made["train"], made["other"]
    refused(device_main, ["export", run, "--out", existing], existing)
    refused(device_main, ["predict", run, train, "--out", existing], existing)
    refused(device_main, ["train", train, "--out", run, "--epochs", "1", "--rank", "4", "--heads", "2"], run, code=1)
    report = tmp_path / "report"
    assert CliRunner().invoke(device_main, ["report", str(run), "--out", str(report)]).exit_code == 0
    refused(device_main, ["report", run, "--out", report], report / "report.json")
    converted = tmp_path / "int8"
    assert CliRunner().invoke(cloud_main, ["convert", str(train), "--dtype", "int8", "--out", str(converted)]
                              ).exit_code == 0
    refused(cloud_main, ["convert", other, "--dtype", "int8", "--out", converted], converted, code=1)
    copied = tmp_path / "copied"
    assert CliRunner().invoke(device_main, ["pull", str(train), str(copied)]).exit_code == 0
    refused(device_main, ["pull", other, copied], copied, code=1)
    refused(cloud_main, ["push", other, copied], copied, code=1)
    # ... and each replaces it when asked.
    for args in (["export", run, "--out", existing, "--overwrite"],
                 ["predict", run, train, "--out", existing, "--overwrite"],
                 ["report", run, "--out", report, "--overwrite"]):
        result = CliRunner().invoke(device_main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    assert existing.read_bytes().startswith(b"id,label")


def test_export_in_the_old_form_says_the_new_one(made: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(device_main, ["export", str(made["run"]), str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2 and f"--out {tmp_path / 'a.safetensors'}" in result.output
    assert not (tmp_path / "a.safetensors").exists()


# ---- sizes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("512M", 512 << 20), ("2G", 2 << 30), ("2g", 2 << 30), ("64K", 64 << 10),
                                             ("1.5G", 3 << 29), ("512MiB", 512 << 20), ("512MB", 512 << 20),
                                             ("1T", 1 << 40), ("4096", 4096), ("10b", 10)])
def test_one_size_syntax_with_binary_units(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_a_size_prints_back_as_it_was_written() -> None:
    assert format_bytes(parse_bytes("1M")) == "1.0 MiB" and format_bytes(parse_bytes("512M")) == "512.0 MiB"


def test_every_size_option_takes_the_size_syntax() -> None:
    sizes = {(name, long_flag(p)) for _prog, name, _c, p in every_option() if isinstance(p.type, Size)}
    assert {("train", "--max-memory"), ("extract", "--max-memory"), ("push", "--part-size"), ("push", "--max-rate"),
            ("pull", "--max-rate"), ("serve", "--max-body-bytes")} <= sizes
    for prog, name, _command, param in every_option():  # no size left as a bare count of MiB or bytes
        if not isinstance(param.type, Size):
            assert not re.search(r"\bMiB\b|many bytes|in bytes", param.help or ""), f"{prog} {name} {param.opts}"


def test_a_size_below_its_minimum_says_so_and_how_to_write_one() -> None:
    result = CliRunner().invoke(cloud_main, ["push", "a", "b", "--part-size", "64"])
    assert result.exit_code == 2 and "at least 5.0 MiB" in result.output and "512M" in result.output


# ---- help ------------------------------------------------------------------------------------------------


def help_text(prog: str, *args: str) -> str:
    result = CliRunner().invoke(GROUPS[prog], [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_help_opens_with_what_a_newcomer_chooses() -> None:
    text = help_text("mist-device", "train")
    sections = re.findall(r"^(\S[^\n]*):$", text, re.M)
    assert sections[0].startswith("Start here") and "Other options" not in sections, sections
    first = text.split(sections[0] + ":")[1].split(sections[1] + ":")[0]
    for flag in ("--model", "--grid", "--val-split", "--val ", "--epochs", "--out"):
        assert flag in first, flag


def test_help_points_only_to_what_a_wheel_install_has() -> None:
    for prog, group in GROUPS.items():
        for name in [None, *group.commands]:
            text = help_text(prog, *([name] if name else []))
            # docs/ is not in a wheel; the spec is, as mist/formats/SPEC.md (package data)
            assert "docs/" not in text and not re.search(r"(?<!mist/)formats/SPEC", text), f"{prog} {name or ''}"


def test_the_seed_range_is_readable() -> None:
    assert SEED._describe_range() == "0<=x<2^63"
    assert "9223372036854775807" not in help_text("mist-device", "train")


def test_counts_agree_with_their_nouns(made: dict[str, Path], tmp_path: Path) -> None:
    one = write_digits_set(tmp_path / "one", slice(0, 50), shard_rows=128)
    info = CliRunner().invoke(device_main, ["info", str(one)]).output
    assert "50 in 1 shard " in info and "1 shards" not in info
    verify = CliRunner().invoke(device_main, ["verify", str(one)]).output
    assert "50 rows, 1 shard," in verify
    search = CliRunner().invoke(device_main, ["train", str(made["train"]), "--out", str(tmp_path / "g"),
                                              "--grid", "lr=1e-2", "--val-split", "0.2", "--epochs", "1",
                                              "--rank", "4", "--heads", "2", "--progress", "none"])
    assert search.exit_code == 0, search.output
    assert "1 adaptor and 0 probes" in search.output and "1 adaptor trained" in search.output
    assert "1 adaptors" not in search.output
