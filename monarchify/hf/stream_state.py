"""What lets an interrupted streaming conversion resume: its staging folder and state file.

A streaming run (:mod:`.streaming`) writes its shards into a staging folder beside the output
that survives an interruption, with a small state file saying what the run converts (a
fingerprint of the source files, recipe, calibration text, version, shard layout and device)
and which shards are finished. A run asked to resume keeps the finished shards when the
fingerprint is the same; any other run starts over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.hf.checkpoint import Checkpoint
from monarchify.hf.tensorfiles import Planned
from monarchify.samples import TextSamples

STATE_FILE = ".monarchify-stream.json"
"""Inside the staging folder: what the run is converting, and which shards are finished."""
STATE_VERSION = 2


def fingerprint(checkpoint: Checkpoint, config: MonarchConfig, shards: list[list[Planned]], version: str,
                samples: TextSamples | None, device: str) -> str:
    """What a resumed run must share with the interrupted one: the same source files (names,
    sizes, modification times), recipe, calibration text, monarchify version, shard layout
    (``shards``: the tensors each output shard holds) and device. The device too: a projection
    on CUDA does not give the CPU's factors bit for bit, and a folder whose first shards came
    from one and the rest from the other would match neither run."""
    files = sorted({t.file for t in checkpoint.tensors.values()})
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    layout = [[(t.name, str(t.dtype), t.shape) for t in shard] for shard in shards]
    text_used = [samples.fit, samples.heldout] if samples is not None else None
    text = json.dumps([stats, config.to_dict(), version, layout, text_used, str(torch.device(device))], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def staging_folder(out: Path) -> Path:
    """Where a streaming run into ``out`` stages its shards (beside it, hidden)."""
    dest = out.resolve()
    return dest.parent / f".{dest.name}.partial-stream"


def _read(staging: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((staging / STATE_FILE).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else None
    except (OSError, ValueError):
        return None


@dataclass
class StreamState:
    """The staging folder of one run, and the shards in it that are finished."""

    staging: Path
    state: dict[str, Any]

    @classmethod
    def open(cls, out: Path, fingerprint: str, source: Path, resume: bool, note: Callable[[str], None]) -> StreamState:
        """The staging folder for a run into ``out``, created or, with ``resume`` and the same
        ``fingerprint``, kept with its finished shards; another run's is discarded, except
        when asked to resume it (then it is an error: its shards would not match)."""
        staging = staging_folder(out)
        state = _read(staging) if staging.is_dir() else None
        if staging.exists() and not (resume and state is not None and state.get("fingerprint") == fingerprint):
            if resume and state is not None:
                raise ConfigError(
                    f"the unfinished conversion in '{staging}' was started from other files, with another recipe or on another device; "
                    "start over without resuming (its finished shards are then discarded)"
                )
            if resume:
                note(f"nothing to resume in '{staging}': starting over")
            shutil.rmtree(staging)
            state = None
        elif resume and state is None:
            note("nothing to resume: starting from the first shard")
        staging.mkdir(parents=True, exist_ok=True)
        opened = cls(staging, state or {"version": STATE_VERSION, "fingerprint": fingerprint, "source": str(source), "done": {}})
        if state is None:
            opened._write()
        return opened

    def finished(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Shard name -> the layer errors recorded with it, for the shards of ``names`` that
        are finished and still there."""
        return {name: errors for name, errors in self.state["done"].items() if (self.staging / name).is_file() and name in names}

    def mark_finished(self, name: str, errors: dict[str, Any]) -> None:
        self.state["done"][name] = errors
        self._write()

    def _write(self) -> None:
        tmp = self.staging / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state), encoding="utf-8")
        tmp.replace(self.staging / STATE_FILE)
