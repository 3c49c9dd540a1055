"""The calibration run folder: where every SCQ stage's output lives, and what makes it reusable.

    RUN/
      recipe.yaml            the recipe this run follows (a different one is refused unless restarted)
      run.json               source model folder and each stage's fingerprint
      .lock                  held by the `mgtq calibrate` working in RUN (names its holder)
      synth/      stage.json, dataset/               the synthesized calibration set
      synth-progress/  shards of a synthesis under way (removed once synth/ is written)
      qat/        stage.json, transformer/           the QAT float (latent) weights
                  [a8-plan.json]                     the A8 set chosen before QAT (QATConfig.needs_a8_set)
      qat-state/  accelerate state + trainer.json    resumable QAT progress (removed once qat/ is written)
      magnitudes/ stage.json, magnitudes.json        per-layer input magnitudes
      secondary/  stage.json, selection.json, magnitudes.png   the A8 set and its input scales

Each stage folder is written atomically with a `stage.json` holding the fingerprint of everything it
depends on and the fingerprint of its own files; a stage is complete while the first is the one the
current recipe, model and prompts give and the second still matches its files. `mgtq calibrate --out`
takes only a new or empty folder or a run (its run.json), never one holding anything else.
This module is the only one that knows these names.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from mgtq.config import read_mapping
from mgtq.files import (atomic_directory, atomic_write_text, read_json, recover_atomic_target, remove_directory,
                        write_json)
from mgtq.hashing import files_fingerprint
from mgtq.scq.recipe import Recipe, dump_recipe, recipe_from_dict

STAGES = ("synth", "qat", "magnitudes", "secondary")  # folder names, in the order of the flow

_WINDOWS = os.name == "nt"
# The lock file holds its holder's record in its first _HOLDER_BYTES bytes (what a refused process reads to name
# it). On Windows the lock is one locked byte, and byte locks there are mandatory (a locked byte cannot be read
# through another handle), so that byte lies just past the record rather than on it; locking past a file's end
# is allowed there.
_HOLDER_BYTES = 4096
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows opens in text mode unless told otherwise


class RunFolderBusy(ValueError):
    """Another `mgtq calibrate` holds the run folder."""


class RunFolder:
    RECIPE = "recipe.yaml"
    INFO = "run.json"
    LOCK = ".lock"
    MARKER = "stage.json"
    QAT_STATE = "qat-state"
    SYNTH_PROGRESS = "synth-progress"
    # files inside the stage folders
    DATASET = "dataset"
    QAT_WEIGHTS = "transformer"
    A8_PLAN = "a8-plan.json"
    MAGNITUDES = "magnitudes.json"
    SELECTION = "selection.json"
    PLOT = "magnitudes.png"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # ----------------------------------------------------------------------------------- paths
    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown SCQ stage {stage!r}; stages are {list(STAGES)}")
        return self.root / stage

    @property
    def dataset(self) -> Path:
        return self.stage_dir("synth") / self.DATASET

    @property
    def qat_weights(self) -> Path:
        return self.stage_dir("qat") / self.QAT_WEIGHTS

    @property
    def qat_state(self) -> Path:
        return self.root / self.QAT_STATE

    @property
    def synth_progress(self) -> Path:
        return self.root / self.SYNTH_PROGRESS

    def progress_dir(self, stage: str) -> Path | None:
        """Where a stage keeps its work while under way (what a killed run resumes from), if it keeps any."""
        self.stage_dir(stage)  # a stage's name or ValueError
        return {"synth": self.synth_progress, "qat": self.qat_state}.get(stage)

    @property
    def a8_plan_file(self) -> Path:
        return self.stage_dir("qat") / self.A8_PLAN

    @property
    def magnitudes_file(self) -> Path:
        return self.stage_dir("magnitudes") / self.MAGNITUDES

    @property
    def selection_file(self) -> Path:
        return self.stage_dir("secondary") / self.SELECTION

    # ------------------------------------------------------------------------------ run state
    def exists(self) -> bool:
        return (self.root / self.INFO).is_file()

    def info(self) -> dict:
        """run.json: {"model": source pipeline folder, "fingerprints": {stage: fingerprint}}."""
        if not self.exists():
            raise FileNotFoundError(f"{self.root} is not a calibration run (no {self.INFO}); run "
                                    f"`mgtq calibrate --out {self.root}` first")
        info = read_json(self.root / self.INFO)
        if not (isinstance(info, dict) and isinstance(info.get("model"), str)
                and isinstance(info.get("fingerprints"), dict)):
            raise ValueError(f"{self.root / self.INFO} is not an mgtq run record (model, fingerprints); rerun "
                             f"`mgtq calibrate --recipe {self.root / self.RECIPE} --out {self.root} --restart`")
        return info

    def recipe(self) -> Recipe:
        """The recipe this run follows."""
        path = self.root / self.RECIPE
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} has no {self.RECIPE}; it is not a calibration run")
        try:
            return recipe_from_dict(read_mapping(path, fmt="yaml"))
        except ValueError as err:
            raise ValueError(f"{path} cannot be read ({str(err)[:200]}); rerun `mgtq calibrate` with "
                             "--restart and the recipe you want") from None

    def stage_summary(self, stage: str) -> dict:
        return read_json(self.stage_dir(stage) / self.MARKER)

    def load_dataset(self):
        """The synthesized calibration set (a `datasets` Dataset)."""
        from datasets import load_from_disk

        try:
            return load_from_disk(str(self.dataset))
        except Exception as err:  # datasets raises several types for damaged folders
            raise ValueError(f"the synthesized calibration set in {self.dataset.parent} is damaged ({err}); delete "
                             "that folder and run `mgtq calibrate` again to re-synthesize it") from err

    def stage_complete(self, stage: str, fingerprint: str) -> bool:
        """Whether the stage ran with `fingerprint` and its files are still the ones it wrote."""
        return self.stage_ran(stage, fingerprint) and not self.changed_outputs(stage)

    def stage_ran(self, stage: str, fingerprint: str) -> bool:
        """Whether the stage's marker says it ran with `fingerprint`."""
        marker = self.stage_dir(stage) / self.MARKER
        if not marker.exists():
            return False
        try:
            return read_json(marker).get("fingerprint") == fingerprint
        except ValueError:
            return False  # a damaged marker means the stage must run again

    def changed_outputs(self, stage: str) -> str | None:
        """None while the stage's files are those it recorded in its marker; else what differs."""
        folder = self.stage_dir(stage)
        recorded = read_json(folder / self.MARKER).get("outputs")
        if recorded != _outputs_fingerprint(folder):
            return f"the files in {folder}"
        return None

    def check_finished(self) -> None:
        """Raise ValueError naming the first stage that has not run and the command that runs it."""
        fingerprints = self.info()["fingerprints"]
        for stage in STAGES:
            if not self.stage_ran(stage, fingerprints.get(stage, "")):
                raise ValueError(f"stage {stage!r} of {self.root} is not complete; run `mgtq calibrate --recipe "
                                 f"{self.root / self.RECIPE} --out {self.root}` to finish it")

    def write_stage(self, stage: str, fingerprint: str, summary: dict, write: Callable[[Path], None]) -> None:
        """Write a stage's folder atomically: `write(tmp)` puts its files, then the marker; then remove the work
        it kept while under way (at Meissonic's size QAT's state is about 12 GB), which nothing reads once the
        stage is complete: a stage that must run again starts over."""
        with atomic_directory(self.stage_dir(stage)) as tmp:
            write(tmp)
            write_json(tmp / self.MARKER, {"fingerprint": fingerprint, "outputs": _outputs_fingerprint(tmp), **summary})
        progress = self.progress_dir(stage)
        if progress is not None:
            try:
                remove_directory(progress)
            except OSError as err:  # Windows refuses to move a folder whose files a process still maps
                warnings.warn(f"{progress} could not be removed ({err.strerror or err}); nothing reads it any more: "
                              "delete it", RuntimeWarning, stacklevel=2)

    # --------------------------------------------------------------------- starting and locking
    def check_takeable(self, model_dir: str | os.PathLike) -> None:
        """Refuse, before anything is written, a folder that is not new, empty or an mgtq run.

        `mgtq calibrate` replaces its stage folders: in a folder of the user's (or the source model)
        that would delete what it did not write.
        """
        root, model = self.root.resolve(), Path(model_dir).resolve()
        if root == model or model in root.parents or root in model.parents:
            raise ValueError(f"--out {self.root} overlaps the source model {model_dir}; calibrate into a new folder")
        if not root.exists():
            return
        if not root.is_dir():
            raise ValueError(f"--out {self.root} is a file; give a new folder (or an mgtq calibration run)")
        if self.exists():
            self.info()  # an mgtq run: its record must be one
            return
        theirs = sorted(p.name for p in root.iterdir() if p.name != self.LOCK)
        if theirs:
            shown = ", ".join(theirs[:5]) + (", …" if len(theirs) > 5 else "")
            raise ValueError(f"--out {self.root} is not empty ({shown}) and is not an mgtq calibration run; mgtq "
                             "calibrate writes only into a new or empty folder or its own run: choose another --out")

    @contextlib.contextmanager
    def lock(self):
        """Hold the run folder for this process: a second `mgtq calibrate` on it fails at once.

        A lock the system drops when the holder dies (flock; a byte lock on Windows), so a killed run never
        leaves the folder locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / self.LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
        try:
            self._take(fd, exclusive=True, then="or calibrate into another --out folder")
            try:
                holder = {"pid": os.getpid(), "host": socket.gethostname(),
                          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps(holder).encode())
                yield self
            finally:
                _unlock(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def reading(self):
        """Hold the run folder against a `mgtq calibrate` while reading it (export): a shared lock, so exports
        may run side by side and a read-only folder can be read; a calibrate at work makes it fail at once.

        Windows has no shared byte lock: there an export holds the same exclusive lock as calibrate for as long
        as it reads, so a second export of the run at that moment is refused (and told to wait) rather than a
        calibrate being let in to replace stages under a reading export."""
        path = self.root / self.LOCK
        try:
            fd = os.open(path, os.O_RDONLY | _O_BINARY)
        except FileNotFoundError:  # no calibrate ever held it
            yield self
            return
        try:
            self._take(fd, exclusive=False, then="then export")
            try:
                yield self
            finally:
                _unlock(fd)
        finally:
            os.close(fd)

    def _take(self, fd: int, exclusive: bool, then: str) -> None:
        """Lock the lock file (`exclusive` or shared), at once or RunFolderBusy naming the holder it records."""
        if _try_lock(fd, exclusive):
            return
        # exports record nothing: a refusal where one may hold the lock says so
        reader = " or by an `mgtq export` reading it" if exclusive or _WINDOWS else ""
        raise RunFolderBusy(f"{self.root} is in use by {_holder(_read_start(fd))}{reader}; wait for it to finish "
                            f"(or stop it), {then}")

    def start(self, recipe: Recipe, model_dir: Path, fingerprints: dict[str, str], restart: bool = False) -> None:
        """Take up the folder for `recipe` (call under :meth:`lock`): clean debris of killed writes,
        refuse a different recipe unless `restart`, record recipe and run.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in (*STAGES, self.QAT_STATE, self.SYNTH_PROGRESS, self.RECIPE, self.INFO):
            recover_atomic_target(self.root / name)
        if (self.root / self.RECIPE).exists() and not restart:
            try:
                previous = self.recipe()
            except ValueError as err:
                raise ValueError(f"{err}; or choose another --out folder") from None
            changed = previous.differences(recipe)
            if changed:
                shown = ", ".join(changed[:4]) + (", …" if len(changed) > 4 else "")
                raise ValueError(
                    f"{self.root} is a calibration run of another recipe ({self.root / self.RECIPE} differs in "
                    f"{shown}); resume it with `--recipe {self.root / self.RECIPE}`, start it over with this "
                    "recipe by adding --restart, or choose another --out folder")
        atomic_write_text(self.root / self.RECIPE, dump_recipe(recipe))
        write_json(self.root / self.INFO, {"model": str(model_dir), "fingerprints": fingerprints})


def _outputs_fingerprint(folder: Path) -> str:
    """Fingerprint of a stage folder's files, its marker left out."""
    return files_fingerprint({p.name: p for p in folder.iterdir() if p.name != RunFolder.MARKER})


def _try_lock(fd: int, exclusive: bool) -> bool:
    """Lock `fd`'s file without waiting (shared where not `exclusive`, except on Windows: see
    RunFolder.reading); False when another open of it holds the lock."""
    if _WINDOWS:
        import msvcrt

        os.lseek(fd, _HOLDER_BYTES, os.SEEK_SET)  # msvcrt locks from the file position
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except PermissionError:  # EACCES: the byte is locked through another handle
            return False
        return True
    import fcntl  # POSIX only

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    """Release _try_lock's lock. A flock goes with the descriptor's close; Windows may release a byte lock only
    some time after the close, so it is unlocked here at once."""
    if _WINDOWS:
        import msvcrt

        os.lseek(fd, _HOLDER_BYTES, os.SEEK_SET)
        with contextlib.suppress(OSError):  # the close that follows releases it too, only later
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read_start(fd: int) -> bytes:
    """The holder record: the first _HOLDER_BYTES bytes of the lock file."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, _HOLDER_BYTES)


def _holder(raw: bytes) -> str:
    """'pid 123 on host since … (command)' from a lock file's contents."""
    try:
        h = json.loads(raw.decode("utf-8"))
        return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"  # the holder has not written its name yet
