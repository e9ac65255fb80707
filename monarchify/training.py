"""The training core: what every run that trains shares, whatever trains it.

Fine-tuning (:mod:`monarchify.glue.train`, and ``compress``'s stages through it), training from
scratch (:mod:`monarchify.lm.train`) and healing (:mod:`monarchify.heal`, for ``heal`` and
``compress --text``) each drive their own loop, two through ``Trainer`` and one by hand. What
they must not each do their own way is here, once:

* :func:`check_precision`: whether this machine can run the asked precision, before anything loads;
* :class:`StepTimer`: the wall time of every optimisation step, and the median the results report
  (``Trainer`` runs feed it through :class:`monarchify.hf.training_arguments.StepTimerCallback`);
* :func:`load_average` and :func:`run_environment`: the machine a result was measured on;
* :func:`check_resume` and :func:`record_run`: a resume continues only the run it was asked to,
  through the run manifest (:mod:`monarchify.manifest`), refused in one line naming what changed;
* :class:`RunEvents`: what a run tells its front end.

Torch-free at import: the command line imports the options modules, which take
:data:`PRECISIONS` and :class:`RunEvents` from here, to build its help.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from monarchify.errors import ConfigError
from monarchify.manifest import RESUME_ADVICE, RunManifest, StageRecord, fingerprint

PRECISIONS = ("fp32", "bf16", "fp16")
WARMUP_STEPS_IGNORED = 3
"""Step-time medians skip the first steps of a run or phase (allocator and cache warm-up)."""


# --------------------------------------------------------------------------------- precision


def check_precision(precision: str) -> None:
    """Refuse a precision this machine cannot train in, in one line and before anything loads
    (``Trainer`` would refuse too, but only after the data and the models were loaded).

    Mixed precision is for CUDA GPUs, where every run trains when there is one: fp16 needs a GPU,
    bf16 one that supports it. A CPU is refused both, by every command alike: ``Trainer`` would
    autocast bf16 on a CPU, but slower than fp32 on most, which is not what the option asks for."""
    if precision == "fp32":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"precision {precision} needs a CUDA GPU; this machine has none (use fp32)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16 needs a GPU with bf16 support (use fp16 or fp32)")


# ---------------------------------------------------------------------------------- timing


def median_ms(step_seconds: Sequence[float], skip: int = WARMUP_STEPS_IGNORED) -> float | None:
    """The median step in milliseconds, the first ``skip`` steps left out when more are there
    (``None`` without steps): the median, because one step slowed by the machine or a first
    allocation would move a mean, and step times are what variants are compared by."""
    kept = list(step_seconds[skip:]) or list(step_seconds)
    return 1000 * statistics.median(kept) if kept else None


class StepTimer:
    """The wall time of every optimisation step (forward, backward, optimizer step) and of
    nothing else: evaluating, checkpointing and printing progress are left out, so two runs
    compare by how fast they train, not by how often they evaluated.

    ``step_seconds`` starts from an earlier session's (a resumed run's steps are the whole
    run's). Call :meth:`begin` and :meth:`end` around each step."""

    def __init__(self, step_seconds: Sequence[float] = ()) -> None:
        self.step_seconds = list(step_seconds)
        self._start: float | None = None

    def begin(self) -> None:
        self._start = time.perf_counter()

    def end(self) -> None:
        if self._start is not None:
            self.step_seconds.append(time.perf_counter() - self._start)
            self._start = None

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    def median_ms(self, start: int = 0, stop: int | None = None) -> float | None:
        """:func:`median_ms` of steps ``start`` to ``stop`` (a phase of the run)."""
        return median_ms(self.step_seconds[start:stop])


# ---------------------------------------------------------------------------------- the machine


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (``None`` where the system keeps none): a
    busy machine explains a slow run."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def peak_rss_mib() -> float | None:
    """The most memory this process has held so far, in MiB (``None`` where the system keeps no
    count). A high-water mark: read after a stage, it is that stage's peak if nothing before it
    held more."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)  # bytes on macOS, KiB elsewhere


def source_fingerprint() -> str:
    """A hash of monarchify's own source files: which code produced a result, even uncommitted."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_environment() -> dict[str, Any]:
    """Versions, device and parallelism of this run. Taken when the run starts, so the source
    hash describes the code the run imported, not code edited while it trained. transformers'
    version is read from its installed metadata, not by importing it: this module sits below
    the layers that may (the timing of single layers reads the load from here)."""
    import torch

    from monarchify.version import __version__

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "monarchify": __version__,
        "monarchify_source_sha256": source_fingerprint(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "python": platform.python_version(),
        "device": device,
        "cuda_devices": torch.cuda.device_count(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


# ---------------------------------------------------------------------------------- resume


def check_resume(
    folder: str | os.PathLike[str],
    stage: str,
    options: dict[str, Any],
    *,
    what: str = "the checkpoints",
    manifest: RunManifest | None = None,
    advice: str = RESUME_ADVICE,
) -> str:
    """Refuse to continue ``stage``'s work in ``folder`` with options other than it was made
    with, in one line naming each option that changed (:meth:`RunManifest.check_resume`);
    otherwise its status (``"new"``: nothing recorded, the caller decides). ``manifest``: the
    record to check against when the folder's own is not the one (an earlier version's, read
    by :func:`recorded`)."""
    manifest = manifest if manifest is not None else RunManifest.load(folder)
    return manifest.check_resume(stage, options, what, advice)


def record_run(folder: str | os.PathLike[str], stage: str, options: dict[str, Any]) -> None:
    """Write the options that decide ``stage`` into ``folder``'s run manifest, so a later
    resume can check it continues the same run (:func:`check_resume`)."""
    manifest = RunManifest.load(folder)
    manifest.check(stage, options)
    manifest.start(stage, options)


def recorded(folder: str | os.PathLike[str], stage: str, options: dict[str, Any]) -> RunManifest:
    """A manifest holding ``stage`` begun with ``options``: what a folder written before run
    manifests existed recorded in its own way, read as one, so it is checked the same way."""
    return RunManifest(Path(folder), {stage: StageRecord(fingerprint(options), dict(options))})


# ---------------------------------------------------------------------------------- events


class RunEvents:
    """What a run tells its front end; every method is optional."""

    def stage(self, message: str) -> None:
        """A long step starts (only after the input was checked: an error ends with one line)."""

    def done(self, message: str) -> None:
        """A step finished, e.g. what was loaded."""

    def note(self, message: str) -> None:
        """Something the user should know (a new head, skipped rows...)."""
