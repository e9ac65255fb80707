"""One word for one thing: docs/cli.md's vocabulary table is what the commands accept, the old
spellings still parse to the same options with one warning line, and errors name the flag the
user typed rather than the library's field."""

from __future__ import annotations

import json
import re

import pytest
import typer

from conftest import REPO
from monarchify.cli.app import app, main
from monarchify.cli.options import DEPRECATED, MODEL, add_deprecated_aliases

FIRST_ARGUMENT = "first argument"


def commands() -> dict[str, object]:
    """Every command by its name (``bench model``), as Click sees it, old spellings installed."""
    found = {}

    def walk(group, path):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, (*path, name))
            else:
                found[" ".join((*path, name))] = command

    walk(add_deprecated_aliases(typer.main.get_command(app)), ())
    return found


COMMANDS = commands()


def visible_options(command) -> set[str]:
    return {name for param in command.params if param.param_type_name == "option" and not param.hidden
            for name in (*param.opts, *param.secondary_opts)}


def vocabulary() -> list[dict[str, object]]:
    """The rows of docs/cli.md's vocabulary table: the words, the commands and, per old
    spelling, the commands it is an old spelling in (a parenthesis after a group of old
    spellings names its commands; without one, the row's)."""
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("## Vocabulary", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("concept", "---"):
            continue
        concept, word, where, old = cells
        names = re.findall(r"`([^`]+)`", where)
        old_spellings: dict[str, list[str]] = {}
        pending: list[str] = []
        for token, group in re.findall(r"`([^`]+)`|\(([^)]*)\)", old):
            if token:
                pending.append(token)
            else:
                for spelling in pending:
                    old_spellings[spelling] = re.findall(r"`([^`]+)`", group)
                pending = []
        for spelling in pending:
            old_spellings[spelling] = names
        rows.append({"concept": concept, "words": FIRST_ARGUMENT if word == FIRST_ARGUMENT else re.findall(r"`([^`]+)`", word),
                     "commands": names, "old": old_spellings})
    return rows


VOCABULARY = vocabulary()


def test_the_table_is_there():
    assert len(VOCABULARY) > 25
    assert {command for row in VOCABULARY for command in row["commands"]} == set(COMMANDS)


@pytest.mark.parametrize("row", VOCABULARY, ids=[row["concept"] for row in VOCABULARY])
def test_every_command_uses_the_documented_word(row):
    for name in row["commands"]:
        command = COMMANDS[name]
        if row["words"] == FIRST_ARGUMENT:
            assert command.params[0].param_type_name == "argument", f"{name}: the model is not its first argument"
            assert "--model" not in visible_options(command), name
            continue
        missing = set(row["words"]) - visible_options(command)
        assert not missing, f"{name} lacks {missing} ({row['concept']})"
        stale = {old for old, names in row["old"].items() if name in names} & visible_options(command)
        assert not stale, f"{name} still shows {stale} for {row['concept']}"


def test_the_table_lists_every_old_spelling_and_no_other():
    documented = {(name, old) for row in VOCABULARY for old, names in row["old"].items() for name in names}
    assert documented == {(name, old) for name, aliases in DEPRECATED.items() for old in aliases}
    for row in VOCABULARY:
        for old, names in row["old"].items():
            for name in names:
                new = DEPRECATED[name][old]
                assert (row["words"] == FIRST_ARGUMENT) if new is MODEL else new in row["words"], (name, old)


def test_no_command_shows_two_words_for_one_concept():
    """A word that is an old spelling somewhere is visible only where it is the current word
    of another concept (``--warmup``: untimed calls in ``bench``)."""
    current = {(name, word) for row in VOCABULARY if row["words"] != FIRST_ARGUMENT
               for name in row["commands"] for word in row["words"]}
    for name, command in COMMANDS.items():
        for old in {old for aliases in DEPRECATED.values() for old in aliases} & visible_options(command):
            assert (name, old) in current, f"{name} shows {old}, an old spelling, as a word of its own"


REQUIRED = {
    "convert": ["m"],
    "heal": ["m", "--teacher", "t", "--text", "d", "--out", "o"],
    "finetune": ["m", "--task", "mrpc", "--out", "o"],
    "compress": ["m", "--out", "o"],
    "train": ["--arch", "gpt2", "--text", "d", "--out", "o"],
    "eval": ["m", "--text", "d"],
    "bench model": ["m"],
}
"""Arguments each command with old spellings needs to parse."""


def without(args: list[str], flag: str | None) -> list[str]:
    """``args`` without ``flag`` and its value (``None``: without the first argument)."""
    if flag is None:
        return args[1:]
    if flag not in args:
        return args
    at = args.index(flag)
    return args[:at] + args[at + 2:]


def parse(args: list[str]) -> dict[str, object]:
    """The options a command line gives its command, running nothing."""
    group = add_deprecated_aliases(typer.main.get_command(app))
    context = group.make_context("monarchify", list(args))
    command = group
    while hasattr(command, "resolve_command"):
        rest = [*getattr(context, "_protected_args", getattr(context, "protected_args", [])), *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)
    return context.params


OLD_SPELLINGS = [(name, old, new) for name, aliases in DEPRECATED.items() for old, new in aliases.items()]


@pytest.mark.parametrize("name,old,new", OLD_SPELLINGS, ids=[f"{n} {o}" for n, o, _ in OLD_SPELLINGS])
def test_an_old_spelling_means_the_new_one_and_says_so_once(name, old, new, capsys):
    base = without(REQUIRED[name], new)
    value = "m" if new is MODEL else "3"
    new_args = [value, *base] if new is MODEL else [*base, new, value]
    expected = parse([*name.split(), *new_args])
    assert capsys.readouterr().err == ""  # the new spelling: no warning
    assert parse([*name.split(), *base, old, value]) == expected
    if old.startswith("--"):
        assert parse([*name.split(), *base, f"{old}={value}"]) == expected
    else:
        assert parse([*name.split(), *base, f"{old}{value}"]) == expected
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines  # one line per command line, however the old spelling is written
    instead = "give the model as the first argument" if new is MODEL else f"use {new}"
    assert lines[0].startswith(f"warning: {old} is deprecated") and instead in lines[0]


def test_an_old_spelling_used_twice_warns_once(capsys):
    parse(["bench", "model", "m", "--gen-batch", "1", "--gen-batch", "8"])
    assert parse(["bench", "model", "m", "--gen-batch-size", "1", "--gen-batch-size", "8"])["gen_batch"] == [1, 8]
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_an_old_spelling_of_one_command_is_another_commands_word(capsys):
    """``--warmup`` is untimed calls in ``bench``, not an old spelling there."""
    assert parse(["bench", "model", "m", "--warmup", "2"])["warmup"] == 2
    assert parse(["finetune", "m", "-t", "mrpc", "-o", "o", "--warmup", "0.2"])["warmup"] == 0.2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_old_spellings_work_end_to_end(tmp_path, capsys):
    """Through ``main``: the warning comes first, then the command runs as with the new word."""
    code = main(["heal", str(tmp_path / "m"), "--teacher", "t", "--data", "d", "-o", str(tmp_path / "o"), "--lr", "-1"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 2
    assert err[0].startswith("warning: --data is deprecated") and err[1] == "Error: --lr must be positive, got -1.0"


@pytest.fixture
def config_only(tmp_path):
    """A folder with a config.json: enough for convert to decide whether it can stream."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


ERRORS = [
    (["finetune", "{tmp}/m", "-t", "sst2", "-o", "{tmp}/o", "--lr", "-1"], "--lr must be positive", "learning_rate"),
    (["train", "-a", "gpt2", "--text", "{tmp}/t", "-o", "{tmp}/o", "--lr", "-1"], "--lr must be positive", "learning_rate"),
    (["compress", "{tmp}/m", "-t", "sst2", "--budget", "0.5", "-o", "{tmp}/o", "--teacher-lr", "-1"],
     "--teacher-lr must be positive", "learning_rate|teacher_lr"),
    (["heal", "{tmp}/m", "--teacher", "t", "--text", "d", "-o", "{tmp}/o", "--lr", "0"], "--lr must be positive", "(?<!-)lr must"),
    (["convert", "{tmp}/m", "-o", "{tmp}/o", "--output-order", "sideways"], "--output-order must be one of", "output_order"),
    (["compress", "{tmp}/m", "-t", "sst2", "--budget", "0.5", "-o", "{tmp}/o", "--output-order", "x"],
     "--output-order must be one of", "output_order"),
    (["train", "-a", "gpt2", "--text", "{tmp}/t", "-o", "{tmp}/o", "--densify-at", "0.5"],
     "--densify-at switches Monarch layers to dense: train with a Monarch recipe (--nblocks)", r"\(monarch\)|densify_at"),
    (["train", "-a", "gpt2", "--text", "{tmp}/t", "-o", "{tmp}/o", "-b", "4", "--densify-at", "1.5"],
     "--densify-at must be a fraction", "densify_at"),
    (["convert", "{tmp}/m", "-o", "{tmp}/o", "--nblocks", "0"], "--nblocks must be a positive integer", "(?<!-)nblocks must"),
    (["convert", "{model}", "-o", "{tmp}/o", "--only-if-faster", "--stream"],
     "cannot stream this conversion: --only-if-faster is not available when streaming", "speed"),
    (["convert", "{model}", "-o", "{tmp}/o", "--only-if-faster", "--tokens", "0"], "--tokens must be a positive integer", "speed"),
    (["convert", "{model}", "-o", "{tmp}/o", "--text", "d", "--calibration-samples", "0"],
     "--calibration-samples must be a positive integer", r"calibration\.samples"),
    (["convert", "{model}", "-o", "{tmp}/o", "--text", "d", "--refine-sweeps", "-1"],
     "--refine-sweeps must be a non-negative integer", r"calibration\.sweeps"),
    (["finetune", "{tmp}/m", "-t", "sst2", "-o", "{tmp}/o", "--teacher", "d", "--distill-alpha", "2"],
     "--distill-alpha must be between 0 and 1", r"distill\.alpha"),
    (["finetune", "{tmp}/m", "-t", "sst2", "-o", "{tmp}/o", "--warmup-steps", "-1"],
     "--warmup-steps and --weight-decay must not be negative", "(?<!-)warmup and|weight_decay"),
]


@pytest.mark.parametrize("args,message,field", ERRORS, ids=[f"{a[0]} {m.split()[0]}" for a, m, _ in ERRORS])
def test_errors_name_the_flag_not_the_field(args, message, field, tmp_path, config_only, capsys, monkeypatch):
    code = main([a.format(tmp=tmp_path, model=config_only) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("Error: "), err
    assert message in err[0] and not re.search(field, err[0]), err[0]
    assert not (tmp_path / "o").exists()
