"""The run manifest: what each stage of a resumable run was made with.

A resumable run (``compress``'s stages, a fine-tuning or training run's checkpoints, a
streaming conversion's shards, language-model compression) leaves work on disk that a later
run picks up. Picking it up is only right when it was made with the options that decide its
output: a stage converted at budget 0.40 must not be fine-tuned by a run asked for 0.376.

So every such run keeps one small JSON file beside its work, :data:`MANIFEST_FILE`, with one
entry per stage: the options that decide that stage's output, their fingerprint, and whether
the stage finished. Each stage's fingerprint also covers the fingerprint of the stage before
it, so a change upstream makes every later stage stale without each listing the options of
the others. What a caller does with a stale stage is its choice: redo it (``compress``) or
refuse with the option that changed (``finetune --resume``); :meth:`RunManifest.changes`
names the options either way.

Torch-free and written atomically (a temporary file renamed over the old one), so a run
interrupted while saving it leaves the previous manifest whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monarchify.atomic import atomic_write_text
from monarchify.errors import ConfigError

MANIFEST_FILE = "monarchify_run.json"
MANIFEST_VERSION = 1
RESUME_ADVICE = "resume with the options they were made with, or start over without resume"


def canonical(options: dict[str, Any]) -> str:
    """One text per set of options: keys sorted, paths and other objects as their ``str``, and
    a whole float as its integer (2.0 epochs from the command line are the 2 of a script)."""
    return json.dumps(_whole(options), sort_keys=True, default=str, separators=(",", ":"))


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_whole(item) for item in value]
    return value


def fingerprint(options: dict[str, Any], upstream: str = "") -> str:
    """The stage's fingerprint: its own options and the fingerprint of the stage it builds on."""
    return hashlib.sha256((upstream + "\n" + canonical(options)).encode("utf-8")).hexdigest()[:16]


def _normal(options: dict[str, Any]) -> dict[str, Any]:
    """The options as they read back from JSON (tuples become lists, paths strings)."""
    return json.loads(canonical(options))


def describe_change(name: str, before: Any, after: Any) -> str:
    if before is _MISSING:
        return f"{name} (new: {after!r})"
    if after is _MISSING:
        return f"{name} (was {before!r}, now not set)"
    return f"{name} (was {before!r}, now {after!r})"


_MISSING = object()


def _differences(prefix: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Phrases for the keys that differ; a nested group of options (a recipe) is named down to
    the field that changed (``monarch.nblocks``), not printed whole."""
    found = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, _MISSING), new.get(name, _MISSING)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            found += _differences(f"{prefix}{name}.", before, after)
        else:
            found.append(describe_change(prefix + name, before, after))
    return found


@dataclass
class StageRecord:
    fingerprint: str
    options: dict[str, Any]
    done: bool = False


@dataclass
class RunManifest:
    """The manifest of one run, kept in ``folder``. Use :meth:`load`, then per stage in
    order :meth:`check`, :meth:`start` and :meth:`finish`."""

    folder: Path
    stages: dict[str, StageRecord] = field(default_factory=dict)
    _upstream: str = ""
    _checked: dict[str, str] = field(default_factory=dict)
    """The fingerprint each stage got when it was checked (what :meth:`start` records)."""

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_FILE

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> RunManifest:
        """The manifest in ``folder``; an empty one when there is none yet. A manifest that
        cannot be read (cut short, edited by hand, from a newer monarchify) is an error: what
        it describes cannot be trusted, and the user decides (``--force`` starts over)."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not path.is_file():
            return cls(folder)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = data["version"]
            stages = {name: StageRecord(s["fingerprint"], dict(s["options"]), bool(s["done"])) for name, s in data["stages"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the run manifest '{path}' ({exc}); start over with force") from None
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise ConfigError(f"the run manifest '{path}' was written by a newer monarchify (version {version}); "
                              "upgrade monarchify or start over with force")
        return cls(folder, stages)

    def fingerprint_of(self, options: dict[str, Any]) -> str:
        """The fingerprint a stage with ``options`` gets here, after the stages checked so far."""
        return fingerprint(options, self._upstream)

    def check(self, stage: str, options: dict[str, Any]) -> str:
        """How ``stage`` stands for a run with ``options``, after the stages checked before it:

        * ``"done"``: it finished with these options (and these earlier stages): reuse it;
        * ``"started"``: it began with them and did not finish: continue it (its checkpoints);
        * ``"new"``: nothing of it is recorded;
        * ``"stale"``: it was made with other options or on other earlier stages: redo it.

        Checking a stage makes it the upstream of the next one."""
        record = self.stages.get(stage)
        current = self._checked[stage] = self.fingerprint_of(options)
        self._upstream = current
        if record is None:
            return "new"
        if record.fingerprint != current:
            return "stale"
        return "done" if record.done else "started"

    def changes(self, stage: str, options: dict[str, Any]) -> list[str]:
        """The options of ``stage`` that differ from what it was made with, as phrases (empty
        when only an earlier stage changed, or nothing did)."""
        record = self.stages.get(stage)
        if record is None:
            return []
        return _differences("", record.options, _normal(options))

    def check_resume(self, stage: str, options: dict[str, Any], what: str = "the checkpoints", advice: str = RESUME_ADVICE) -> str:
        """:meth:`check` for a run asked to continue ``stage``'s work (``resume``): a stage made
        with other options is refused in one line naming them, since continuing it would
        train one run's checkpoints under another's options. Returns the stage's status
        otherwise (``"new"``: nothing recorded, the caller decides). ``advice`` ends the line:
        what the user can do instead (a run that resumes on its own has no ``resume`` to drop)."""
        status = self.check(stage, options)
        if status != "stale":
            return status
        changed = self.changes(stage, options) or ["an earlier stage"]
        raise ConfigError(f"resume: {what} in '{self.folder}' were made with other options: {'; '.join(changed)}; {advice}")

    def start(self, stage: str, options: dict[str, Any]) -> None:
        """Record that ``stage`` begins with ``options`` (it is not done until :meth:`finish`);
        every stage recorded after it is dropped, since it will be made again on this one.
        The stage must have been checked first (that places it in the chain)."""
        if stage not in self._checked:
            raise RuntimeError(f"stage {stage!r} started before it was checked")
        self._drop_from(stage)
        self.stages[stage] = StageRecord(self._checked[stage], _normal(options))
        self.save()

    def finish(self, stage: str) -> None:
        self.stages[stage].done = True
        self.save()

    def forget(self, stage: str) -> None:
        """Drop ``stage`` and every stage after it (a restart from ``stage``)."""
        if self._drop_from(stage):
            self.save()

    def _drop_from(self, stage: str) -> bool:
        names = list(self.stages)
        if stage not in names:
            return False
        for later in names[names.index(stage):]:
            del self.stages[later]
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"version": MANIFEST_VERSION,
                "stages": {name: {"fingerprint": r.fingerprint, "done": r.done, "options": r.options} for name, r in self.stages.items()}}

    def save(self) -> None:
        """Write the manifest; under several processes only the main one writes (the others
        hold the same record in memory: every process checks and starts the same stages)."""
        from monarchify.distributed import is_main

        if not is_main():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

