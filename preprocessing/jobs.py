"""The one per-slide runner every stage uses: lock → run → release → manifest row.

Several processes (a SLURM job array, or a few workers on one machine) may share one slide list
and one output folder. Each slide is claimed with a lock file created with ``O_CREAT | O_EXCL``,
which contains pid, host and time. A background thread refreshes the lock's mtime while its owner
works. A lock is stale, and broken, when its holder is a dead process on this host or when its
mtime is older than `stale_after_s`. After taking a lock the runner checks the slide's output
again, so a slide finished by another process in the meantime is not redone.

The manifest (``manifest.csv``) has one row per slide. Each finished slide first writes its row
to ``.slidemil/<stage>/rows/<slide_id>.json`` (atomic rename), and the manifest is rebuilt from
those rows, so concurrent and killed workers never leave half-written or repeated rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from preprocessing.errors import ConfigError, MissingMppError, SlidemilError
from preprocessing.inputs import SlideInput
from preprocessing.stores import replace_text

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("id", "path", "stage", "status", "error_type", "message", "n_tiles", "seconds")

#: Statuses of a slide that was processed; anything else counts as failed.
OK_STATUSES = frozenset({"ok", "no_tissue", "partial"})
SKIPPED_STATUS = "skipped"
FAILED_STATUS = "failed"

#: Seconds between lock refreshes, and the default age after which a lock counts as stale.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
#: Seconds between manifest rebuilds during a run (it is always rebuilt at the end).
MANIFEST_REFRESH_S = 30.0


@dataclass(frozen=True)
class SlideOutcome:
    """Result of a stage's per-slide function.

    Attributes:
        status: ``ok``, ``no_tissue`` or ``partial``.
        n_tiles: tiles written for this slide.
        message: note for the manifest (e.g. how many tiles failed to decode).
    """

    status: str = "ok"
    n_tiles: int = 0
    message: str = ""


@dataclass(frozen=True)
class StageResult:
    """Summary of one stage run over a slide list.

    Attributes:
        manifest_path: the stage's ``manifest.csv``.
        n_ok: slides processed in this run (status ok, no_tissue or partial).
        n_failed: slides that raised (including ``no_mpp``).
        n_skipped: slides skipped because a complete output exists or another process locked them.
    """

    manifest_path: Path
    n_ok: int
    n_failed: int
    n_skipped: int
    stage: str = ""

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return self.n_failed == 0

    def summary(self, verb: str = "processed") -> str:
        """Return one line for the user: ``tile: 1 slide tiled, 0 failed, 2 skipped; manifest …``.

        Args:
            verb: past participle of the stage's work (``tiled``, ``extracted``, ``rendered``).
        """
        prefix = f"{self.stage}: " if self.stage else ""
        return (
            f"{prefix}{plural(self.n_ok, 'slide')} {verb}, {self.n_failed} failed, "
            f"{self.n_skipped} skipped; manifest {self.manifest_path}"
        )

    def __str__(self) -> str:
        return self.summary()


def plural(count: int, noun: str) -> str:
    """Return ``"1 slide"`` or ``"2 slides"``: the count with the noun in the matching number."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row; field names are the CSV columns."""

    id: str
    path: str
    stage: str
    status: str
    error_type: str = ""
    message: str = ""
    n_tiles: int | str = ""
    seconds: float | str = ""


def parse_shard(shard: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Return (index, count) of this process's shard, 0 <= index < count.

    Args:
        shard: ``"i/n"`` with a zero-based index, or None to read the SLURM job array variables.
            Then the index is ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
            SLURM_ARRAY_TASK_STEP`` and the count is ``SLURM_ARRAY_TASK_COUNT``, so
            ``--array=0-6:2`` gives tasks 0, 2, 4, 6 the indexes 0 to 3. Without either, the
            result is ``(0, 1)``.
        environ: environment to read instead of ``os.environ`` (tests).

    Raises:
        ConfigError: malformed shard or inconsistent SLURM variables.
    """
    env = os.environ if environ is None else environ
    if shard is None:
        return _slurm_shard(env)
    try:
        return _parse_shard_text(shard)
    except ValueError as err:
        raise ConfigError(f"Invalid --shard: {err}") from err


def check_shard(shard: str | None) -> str | None:
    """Return `shard` unchanged if it is None or a valid ``"i/n"``; for config validators.

    Raises:
        ValueError: malformed shard or index out of range.
    """
    if shard is not None:
        _parse_shard_text(shard)
    return shard


#: Type of a config's ``shard`` field: None or ``"i/n"``, checked when the config is built.
Shard = Annotated[str | None, AfterValidator(check_shard)]


def _parse_shard_text(shard: str) -> tuple[int, int]:
    try:
        index_text, count_text = shard.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError as err:
        raise ValueError(
            f"{shard!r} is not i/n; write it as i/n with 0 <= i < n, e.g. 0/4"
        ) from err
    if count < 1:
        raise ValueError(
            f"{shard!r} asks for {count} shards, but the number of shards n must be at least 1; "
            "write it as i/n with 0 <= i < n, e.g. 0/4"
        )
    if not 0 <= index < count:
        raise ValueError(
            f"{shard!r} asks for shard {index} of {count}, but the index must be 0 to "
            f"{count - 1} (0 <= i < n)"
        )
    return (index, count)


def _slurm_shard(env: Mapping[str, str]) -> tuple[int, int]:
    task_id = env.get("SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return (0, 1)
    try:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        offset = int(task_id) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"SLURM_ARRAY_TASK_ID={task_id!r} is set but SLURM_ARRAY_TASK_COUNT, _MIN or _STEP "
            "is missing or not an integer. Pass --shard i/n explicitly."
        ) from err
    variables = (
        f"SLURM_ARRAY_TASK_ID={task_id}, _MIN={env.get('SLURM_ARRAY_TASK_MIN', '0')}, "
        f"_STEP={step}, _COUNT={count}"
    )
    if step < 1 or offset % step:
        raise ConfigError(
            f"Invalid SLURM job array ({variables}): the task id is not min + k * step. "
            "Pass --shard i/n explicitly."
        )
    index = offset // step
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"Invalid SLURM job array ({variables}): task index {index} is not below the task "
            "count. Pass --shard i/n explicitly, or give --array as a min-max:step range."
        )
    return (index, count)


def select_shard(slides: Sequence[SlideInput], index: int, count: int) -> list[SlideInput]:
    """Return every `count`-th slide of the id-sorted list, starting at `index`."""
    ordered = sorted(slides, key=lambda s: s.slide_id)
    return ordered[index::count]


# Locks -------------------------------------------------------------------------------------


class SlideLock:
    """Lock file claiming one slide for one process.

    The file contains JSON with pid, host, time and a random token. `release` removes it only
    if the token is still ours, so a lock broken by another process is never removed by mistake.
    """

    def __init__(self, path: Path, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = path
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> bool:
        """Create the lock file; break it first if stale. Return False if a live holder has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return True
            if not self._break_if_stale():
                return False
        return False

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if this process still owns it."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = _read_lock(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        content = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "token": self.token,
        }
        with os.fdopen(fd, "w") as handle:
            json.dump(content, handle)
        return True

    def _break_if_stale(self) -> bool:
        """Remove a stale lock under a short-lived guard lock. Return True if one was removed."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # A breaker killed inside this tiny critical section leaves the guard behind.
            if _age_s(guard) > 60.0:
                guard.unlink(missing_ok=True)
            return False
        os.close(fd)
        try:
            holder = _read_lock(self.path)
            reason = _stale_reason(self.path, holder, self.stale_after_s)
            if reason is None:
                return False
            logger.warning("Breaking stale lock %s (%s): %s", self.path, reason, holder)
            self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        interval = min(HEARTBEAT_S, self.stale_after_s / 4)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        self._heartbeat = threading.Thread(target=beat, name=f"lock-{self.path.name}", daemon=True)
        self._heartbeat.start()


def _read_lock(path: Path) -> dict[str, object] | None:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # A holder killed between create and write leaves an empty file; judged by age alone.
        return {}
    return content if isinstance(content, dict) else {}


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _stale_reason(path: Path, holder: dict[str, object] | None, stale_after_s: float) -> str | None:
    if holder is None:
        return None
    age = _age_s(path)
    if age > stale_after_s:
        return f"not refreshed for {age:.0f} s"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        return f"process {pid} on this host is gone"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Manifest ----------------------------------------------------------------------------------


def state_dir(output_dir: Path, stage: str) -> Path:
    """Folder of a stage's lock files and manifest rows inside its output folder."""
    return output_dir / ".slidemil" / stage


def write_row(output_dir: Path, row: ManifestRow) -> None:
    """Store one slide's manifest row atomically (rebuild the CSV with `write_manifest`)."""
    rows_dir = state_dir(output_dir, row.stage) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    final = rows_dir / f"{row.id}.json"
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(row)))
    os.replace(tmp, final)


def read_rows(output_dir: Path, stage: str) -> dict[str, ManifestRow]:
    """Stored manifest rows of a stage by slide id."""
    rows_dir = state_dir(output_dir, stage) / "rows"
    rows: dict[str, ManifestRow] = {}
    for path in sorted(rows_dir.glob("*.json")):
        try:
            row = ManifestRow(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            logger.warning("Ignoring unreadable manifest row %s: %s", path, err)
            continue
        rows[row.id] = row
    return rows


def _read_row(output_dir: Path, stage: str, slide_id: str) -> ManifestRow | None:
    """Stored manifest row of one slide, or None when it is missing or unreadable."""
    path = state_dir(output_dir, stage) / "rows" / f"{slide_id}.json"
    try:
        return ManifestRow(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_manifest(output_dir: Path, stage: str) -> Path:
    """Rebuild ``<output_dir>/manifest.csv`` from the stored rows (atomic, skipped if unchanged)."""
    manifest = output_dir / MANIFEST_NAME
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    for row in read_rows(output_dir, stage).values():
        writer.writerow(asdict(row))
    replace_text(manifest, text.getvalue())
    return manifest


# Progress ----------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """Slides per second and tiles per second of a task."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        tiles = float(task.fields.get("tiles", 0))
        return Text(f"{task.completed / elapsed:.2f} slides/s  {tiles / elapsed:,.0f} tiles/s")


def progress_console() -> Console | None:
    """Console of the rich log handler, if the CLI set one up; None means rich's default.

    Progress bars draw on it so that log lines scroll above the bars instead of breaking them,
    and a stage's per-slide bars must use the same console to join the stage's bar.
    """
    return next(
        (h.console for h in logging.getLogger().handlers if isinstance(h, RichHandler)), None
    )


def _progress(stage: str, enabled: bool) -> Progress:
    console = progress_console()
    return Progress(
        TextColumn(f"[bold]{stage}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}"),
        console=console,
        disable=not enabled,
    )


# Runner ------------------------------------------------------------------------------------


@contextmanager
def _claimed(lock: SlideLock) -> Iterator[bool]:
    acquired = lock.acquire()
    try:
        yield acquired
    finally:
        if acquired:
            lock.release()


def run_slides(
    slides: Sequence[SlideInput],
    process: Callable[[SlideInput], SlideOutcome],
    *,
    stage: str,
    output_dir: Path,
    is_done: Callable[[SlideInput], bool],
    skip_errors: bool = True,
    shard: str | None = None,
    progress: bool = True,
    stale_after_s: float = STALE_AFTER_S,
) -> StageResult:
    """Run `process` once per slide of this shard, with locks, resume and a manifest.

    Args:
        slides: the whole slide list (ids already checked unique); sharding happens here.
        process: does one slide's work and writes its outputs; raises on failure.
        stage: stage name for the manifest and the lock folder (``tile``, ``extract``, ...).
        output_dir: folder of the stage's outputs and of ``manifest.csv``.
        is_done: True when a slide's output is complete; such slides are skipped.
        skip_errors: record a failed slide and continue; when False the error is re-raised
            after its manifest row is written.
        shard: ``"i/n"``; None reads ``SLURM_ARRAY_TASK_ID`` (see `parse_shard`).
        progress: show a rich progress bar with slides and tiles per second.
        stale_after_s: age in seconds after which another host's lock counts as stale.

    Returns:
        Counts of processed, failed and skipped slides and the manifest path.

    Raises:
        ConfigError: an invalid shard or SLURM job array, before any folder is made.
        KeyboardInterrupt: re-raised after logging which slide was interrupted.
    """
    index, count = parse_shard(shard)
    selected = select_shard(slides, index, count)
    if count > 1:
        logger.info(
            "Shard %d/%d: %d of %s", index, count, len(selected), plural(len(slides), "slide")
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the output folder {output_dir} ({err}); choose a writable folder "
            "that is not a file, or create it first"
        ) from err
    locks_dir = state_dir(output_dir, stage) / "locks"

    n_ok = n_failed = n_skipped = 0
    manifest = output_dir / MANIFEST_NAME
    with _progress(stage, progress) as bar:
        task = bar.add_task(stage, total=len(selected), tiles=0, current="")
        n_tiles = 0
        last_manifest = time.monotonic()
        current: SlideInput | None = None
        try:
            for slide in selected:
                current = slide
                bar.update(task, current=slide.slide_id)
                lock = SlideLock(locks_dir / f"{slide.slide_id}.lock", stale_after_s)
                with _claimed(lock) as acquired:
                    if not acquired:
                        logger.info("%s: skipped, locked by another process", slide.slide_id)
                        n_skipped += 1
                    elif is_done(slide):
                        logger.debug("%s: skipped, complete output exists", slide.slide_id)
                        # The row is read now, not at the start of the run, because another
                        # process may have made this output meanwhile. Its row has the real
                        # status and n_tiles, which a skip row would replace.
                        if _read_row(output_dir, stage, slide.slide_id) is None:
                            write_row(output_dir, _skipped_row(slide, stage))
                        n_skipped += 1
                    else:
                        row, error = _run_one(slide, process, stage)
                        write_row(output_dir, row)
                        if error is None:
                            n_ok += 1
                            n_tiles += int(row.n_tiles or 0)
                        else:
                            n_failed += 1
                            if not skip_errors:
                                raise error
                bar.update(task, advance=1, tiles=n_tiles)
                current = None
                if time.monotonic() - last_manifest > MANIFEST_REFRESH_S:
                    write_manifest(output_dir, stage)
                    last_manifest = time.monotonic()
        except KeyboardInterrupt:
            _log_interrupt(stage, current, n_ok + n_failed + n_skipped, len(selected))
            raise
        finally:
            manifest = write_manifest(output_dir, stage)

    result = StageResult(manifest, n_ok, n_failed, n_skipped, stage)
    # The command line prints the summary with the stage's own verb; this line is for the log.
    logger.debug("%s", result)
    return result


def _log_interrupt(stage: str, slide: SlideInput | None, n_done: int, n_total: int) -> None:
    """Log where an interrupt (Ctrl-C, SIGINT) stopped a stage and what the next run redoes."""
    if slide is None:
        logger.warning(
            "%s: interrupted after %d of %d slides; the next run continues with the rest.",
            stage,
            n_done,
            n_total,
        )
        return
    logger.warning(
        "%s: interrupted while processing %s (%d of %d slides done). Outputs are written "
        "atomically, so finished slides are kept and %s will be redone on the next run.",
        stage,
        slide.slide_id,
        n_done,
        n_total,
        slide.slide_id,
    )


def _run_one(
    slide: SlideInput, process: Callable[[SlideInput], SlideOutcome], stage: str
) -> tuple[ManifestRow, Exception | None]:
    """Run one slide and describe it as a manifest row; the error is returned, not raised."""
    start = time.perf_counter()
    try:
        outcome = process(slide)
    except MissingMppError as err:
        logger.error("%s: %s", slide.slide_id, err)
        return _error_row(slide, stage, err, "no_mpp", start), err
    except SlidemilError as err:
        logger.error("%s: %s", slide.slide_id, err)
        return _error_row(slide, stage, err, FAILED_STATUS, start), err
    except Exception as err:  # noqa: BLE001 - one slide must not stop a cohort
        logger.exception("%s: unexpected %s in stage %s", slide.slide_id, type(err).__name__, stage)
        return _error_row(slide, stage, err, FAILED_STATUS, start), err

    seconds = round(time.perf_counter() - start, 3)
    if outcome.status not in OK_STATUSES:
        raise ValueError(f"{stage}: slide status {outcome.status!r} not in {sorted(OK_STATUSES)}")
    row = ManifestRow(
        id=slide.slide_id,
        path=str(slide.path),
        stage=stage,
        status=outcome.status,
        message=outcome.message,
        n_tiles=outcome.n_tiles,
        seconds=seconds,
    )
    return row, None


def _error_row(
    slide: SlideInput, stage: str, err: Exception, status: str, start: float
) -> ManifestRow:
    error_type = err.error_type if isinstance(err, SlidemilError) else type(err).__name__
    return ManifestRow(
        id=slide.slide_id,
        path=str(slide.path),
        stage=stage,
        status=status,
        error_type=error_type,
        message=" ".join(str(err).split()),
        n_tiles=0,
        seconds=round(time.perf_counter() - start, 3),
    )


def _skipped_row(slide: SlideInput, stage: str) -> ManifestRow:
    return ManifestRow(
        id=slide.slide_id,
        path=str(slide.path),
        stage=stage,
        status=SKIPPED_STATUS,
        message="complete output found; not recomputed",
    )
