"""Folders as inputs of ``ben2q remove``: walking, output names, resuming and watching.

``ben2q remove DIR -o OUT`` mirrors DIR's images into OUT (``DIR/a/b.jpg`` ->
``OUT/a/b.png``), so a tree of thousands of photos keeps its structure and every output
has one name fixed by its input: a second run finds the outputs of the first and skips
them (``--overwrite`` redoes them), which is how an interrupted run resumes. Outputs are
written atomically (``atomic_write``), so a file that exists is a finished one.

``--watch`` keeps going after that first pass: ``FolderWatcher`` reports image files that
appear or change (``watchfiles``: inotify/FSEvents, polling where those are unavailable),
each only once its size and modification time have stood still for ``SETTLE_SECONDS``, so
a file still being copied in is not read half-written.

Nothing here runs the model; ``ben2q.cli`` does, with the names decided here.
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

SETTLE_SECONDS = 0.5
"""How long a watched file's size and mtime must hold still before it is read."""
TICK_MS = 200
"""How often the watcher wakes without events, to release files that have settled."""
MASK_SUFFIX = ".mask.png"
UNDECODABLE_FORMATS = frozenset({"MPEG"})
"""Formats Pillow identifies but cannot decode (a video in a photo folder is not an input)."""

Signature = tuple[int, int]
"""(size, mtime_ns) of a file: equal signatures, same contents (for this purpose)."""


# --- which files are images -----------------------------------------------------------------


@cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (``.jpg``) of the formats the decoder accepts.

    Taken from Pillow's registry filtered by ``imageio``'s allowed formats, so a folder walk
    picks exactly what ``load_image`` would decode; stub formats (which need a separate
    handler) and ``UNDECODABLE_FORMATS`` are left out so they do not fail on every run.
    """
    from PIL import Image, ImageFile

    from .imageio import _allowed_formats

    allowed = set(_allowed_formats()) - UNDECODABLE_FORMATS
    allowed = {
        name
        for name in allowed
        if not (
            isinstance(factory := Image.OPEN[name][0], type)
            and issubclass(factory, ImageFile.StubImageFile)
        )
    }
    return frozenset(
        ext.lower() for ext, name in Image.registered_extensions().items() if name in allowed
    )


def is_image_name(name: str) -> bool:
    """Whether a file name is a visible image's (hidden files are editors' and tools')."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in image_extensions()


def signature(path: Path) -> Signature | None:
    """The file's (size, mtime_ns); None if it is gone or not a regular file."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, st.st_mtime_ns


# --- walking ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Root:
    """A directory input: as typed (for messages) and absolute (to match paths against)."""

    given: Path
    path: Path

    @classmethod
    def of(cls, given: str | Path) -> Root:
        return cls(Path(given), Path(given).resolve())


def walk_images(root: Path, *, recursive: bool, exclude: Path | None = None) -> list[Path]:
    """Image files under ``root`` (paths relative to it), in sorted order.

    Sorted so that names given out on collisions (``x_1.png``) are the same on every run;
    hidden files and directories are skipped; ``exclude`` (the output directory when it
    lies inside ``root``) is not entered, so outputs never become inputs. Symbolic links
    to directories are not followed (no loops).
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if recursive:
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and here / d != exclude
            )
        else:
            dirnames[:] = []
        rel = here.relative_to(root)
        found.extend(
            rel / name
            for name in sorted(filenames)
            if is_image_name(name) and os.path.isfile(here / name)
        )
    return found


def is_watched(path: Path, root: Path, *, recursive: bool, exclude: Path | None) -> bool:
    """Whether an absolute ``path`` is an input the walk of ``root`` would have found."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return False
    if not rel.parts or any(part.startswith(".") for part in rel.parts):
        return False
    if not recursive and len(rel.parts) != 1:
        return False
    if exclude is not None and path.is_relative_to(exclude):
        return False
    return is_image_name(rel.name)


# --- output names -------------------------------------------------------------------------


def mask_name(target: Path) -> Path:
    """The mask file beside an output: ``x.png`` -> ``x.mask.png``."""
    return target.with_name(target.stem + MASK_SUFFIX)


def _free(candidates: Iterator[Path], taken: set[Path], mask: bool) -> Path:
    """The first candidate that, with its mask file when asked, is not taken; reserved."""
    for candidate in candidates:
        names = [candidate, mask_name(candidate)] if mask else [candidate]
        keys = [p.resolve() for p in names]
        if not any(key in taken for key in keys):
            taken.update(keys)
            return candidate
    raise AssertionError("unreachable: the candidates never end")


def _numbered(directory: Path, stem: str, extension: str) -> Iterator[Path]:
    yield directory / f"{stem}.{extension}"
    n = 1
    while True:
        yield directory / f"{stem}_{n}.{extension}"
        n += 1


def safe_stem(item: str) -> str:
    """A file-name stem for an input path or URL (``data:`` URLs have none: ``image``)."""
    if item.startswith("data:"):
        return "image"
    path = unquote(urlsplit(item).path) if "://" in item else item
    stem = Path(path).stem.strip()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return safe or "image"


def output_names(
    inputs: Sequence[str],
    output_dir: Path,
    *,
    extension: str = "png",
    mask: bool = False,
    reserved: Iterable[Path] = (),
) -> list[Path]:
    """One ``<stem>.<extension>`` per input in ``output_dir``; never two alike, never an
    input file, never a ``reserved`` path (nor, with ``mask``, a mask file that is one).

    Later duplicates get ``_1``, ``_2``... so that ``a/x.jpg`` and ``b/x.jpg`` both survive.
    """
    taken = {Path(p).resolve() for p in reserved}
    taken.update(Path(item).resolve() for item in inputs if "://" not in item)
    return [
        _free(_numbered(output_dir, safe_stem(item), extension), taken, mask) for item in inputs
    ]


class OutputPlan:
    """Where every input of one run goes, decided once per input and kept, so a file seen
    again (by the watcher) is written to the same place; and no output ever lands on an
    input or on another output."""

    def __init__(self, output_dir: Path, *, extension: str, mask: bool) -> None:
        self.output_dir = output_dir
        self.extension = extension
        self.mask = mask
        self._taken: set[Path] = set()
        self._targets: dict[Path, Path] = {}

    def reserve(self, paths: Iterable[Path]) -> None:
        """Paths no output may take (the inputs), as named and with links resolved."""
        for p in paths:
            self._taken.update((Path(p).absolute(), Path(p).resolve()))

    def files(self, items: Sequence[str]) -> list[Path]:
        """Outputs of inputs named one by one (files, URLs): flat in the output directory."""
        names = output_names(
            items, self.output_dir, extension=self.extension, mask=self.mask, reserved=self._taken
        )
        for name in names:
            self._taken.add(name.resolve())
            if self.mask:
                self._taken.add(mask_name(name).resolve())
        return names

    def mirror(self, root: Root, rel: Path) -> Path:
        """The output of ``root/rel``: the same relative place under the output directory."""
        source = root.path / rel
        target = self._targets.get(source)
        if target is None:
            target = _free(
                _numbered(self.output_dir / rel.parent, rel.stem, self.extension),
                self._taken,
                self.mask,
            )
            self._targets[source] = target
        return target

    def mask_of(self, target: Path) -> Path | None:
        """The mask file of an output, if masks are written."""
        return mask_name(target) if self.mask else None

    def done(self, target: Path) -> bool:
        """Whether an output (and its mask, if asked) is already there: written whole,
        since writes are atomic."""
        mask = self.mask_of(target)
        return target.is_file() and (mask is None or mask.is_file())


@dataclass(frozen=True)
class Task:
    """One input to process: what to read, how to name it in messages, where it goes."""

    source: str
    label: str
    target: Path


def first_pass(
    plan: OutputPlan,
    roots: Sequence[Root],
    items: Sequence[str],
    *,
    recursive: bool,
    overwrite: bool,
    watcher: FolderWatcher | None = None,
) -> tuple[list[Task], int]:
    """The tasks of a run's first pass and how many folder images were skipped as done.

    Every input is reserved before any name is given out, so no output lands on an input.
    Folder images come first, so their mirrored names never depend on the files named
    beside them; those whose outputs exist are skipped unless ``overwrite``. With a
    ``watcher``, every walked file is marked as handled at its current signature.
    """
    exclude = plan.output_dir.resolve()
    walked = [
        (root, rel)
        for root in roots
        for rel in walk_images(root.path, recursive=recursive, exclude=exclude)
    ]
    plan.reserve(root.path / rel for root, rel in walked)
    plan.reserve(Path(item) for item in items if "://" not in item)
    tasks: list[Task] = []
    skipped = 0
    for root, rel in walked:
        source = root.path / rel
        if watcher is not None:
            watcher.mark(source, signature(source))
        target = plan.mirror(root, rel)
        if not overwrite and plan.done(target):
            skipped += 1
        else:
            tasks.append(Task(str(source), str(root.given / rel), target))
    tasks.extend(Task(i, i, t) for i, t in zip(items, plan.files(items), strict=True))
    return tasks, skipped


# --- writing ------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file in the same directory and
    ``os.replace``: an interrupted run leaves either the old file or the new one, never a
    partial file that a resumed run would take for finished (and the temporary name is
    hidden, so no walk or watch picks it up). Not fsynced: this guards against a killed
    process, not a power cut, and an fsync per image would slow fast disks' batches.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as file:  # "x": never follows a planted file; umask applies
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --- stopping -----------------------------------------------------------------------------


class StopOnSignals:
    """SIGINT (Ctrl-C) and SIGTERM set ``event`` instead of killing the process: the batch
    in flight finishes and is written, then the run ends with its summary. A second signal
    raises ``KeyboardInterrupt`` for those who cannot wait. Only in the main thread (where
    Python lets handlers be set); elsewhere it does nothing."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --- watching -----------------------------------------------------------------------------


class Settler:
    """Files seen changing, released once their signature held still for ``settle``
    seconds: a file being copied in keeps growing (or its mtime moving), so it is read only
    once the copy is over."""

    def __init__(self, settle: float = SETTLE_SECONDS) -> None:
        self.settle = settle
        self._pending: dict[Path, tuple[Signature, float]] = {}

    def observe(self, path: Path, now: float) -> None:
        """Note that ``path`` changed (the clock restarts if its signature moved)."""
        sig = signature(path)
        if sig is None:
            self._pending.pop(path, None)
        elif path not in self._pending or self._pending[path][0] != sig:
            self._pending[path] = (sig, now)

    def forget(self, path: Path) -> None:
        self._pending.pop(path, None)

    def ready(self, now: float) -> list[tuple[Path, Signature]]:
        """Files whose signature has not moved for ``settle`` seconds, with it; released
        (a later change makes them pending again)."""
        out: list[tuple[Path, Signature]] = []
        for path, (sig, since) in list(self._pending.items()):
            current = signature(path)
            if current is None:
                del self._pending[path]
            elif current != sig:
                self._pending[path] = (current, now)
            elif now - since >= self.settle:
                out.append((path, sig))
                del self._pending[path]
        return sorted(out)


class FolderWatcher:
    """Image files that appear or change under some roots, in batches, until ``stop``.

    Start it before the first pass: the OS watch then queues every change made meanwhile,
    so a file copied in while the first pass runs is not missed. Each file's signature is
    remembered when it is handed out (``mark`` does the same for the first pass), and a
    file comes out again only with a new one: a file that failed is retried when it
    changes, never in a loop.
    """

    def __init__(
        self,
        roots: Sequence[Root],
        *,
        recursive: bool,
        exclude: Path | None,
        stop: threading.Event,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        import watchfiles

        self.roots = list(roots)
        self.recursive = recursive
        self.exclude = exclude
        self.settler = Settler(settle)
        self._seen: dict[Path, Signature] = {}
        self._changes = watchfiles.watch(
            *(root.path for root in self.roots),
            watch_filter=None,
            debounce=TICK_MS * 2,
            step=50,
            rust_timeout=TICK_MS,
            yield_on_timeout=True,
            stop_event=stop,
            recursive=recursive,
            raise_interrupt=False,
        )
        self._early = next(self._changes, set())  # starts the OS watch now

    def mark(self, path: Path, sig: Signature | None) -> None:
        """Record that ``path`` was handled at ``sig`` (written, failed or skipped)."""
        if sig is not None:
            self._seen[path] = sig

    def root_of(self, path: Path) -> tuple[Root, Path] | None:
        """The first root whose walk includes ``path``, and the path relative to it."""
        for root in self.roots:
            if is_watched(path, root.path, recursive=self.recursive, exclude=self.exclude):
                return root, path.relative_to(root.path)
        return None

    def batches(self) -> Iterator[list[tuple[Path, Signature]]]:
        """Settled files with new contents, as they come; ends when ``stop`` is set."""
        changes: Iterable[tuple[Any, str]] = self._early
        while True:
            now = time.monotonic()
            for change, raw in changes:
                self._note(Path(raw), deleted=change.name == "deleted", now=now)
            fresh = [
                (path, sig)
                for path, sig in self.settler.ready(time.monotonic())
                if self._seen.get(path) != sig
            ]
            for path, sig in fresh:
                self._seen[path] = sig
            if fresh:
                yield fresh
            nxt = next(self._changes, None)
            if nxt is None:
                return
            changes = nxt

    def tasks(self, plan: OutputPlan) -> Iterator[list[Task]]:
        """``batches`` as tasks, each written to its mirrored place in ``plan``."""
        for ready in self.batches():
            batch = []
            for path, _ in ready:
                found = self.root_of(path)
                if found is not None:
                    root, rel = found
                    batch.append(Task(str(path), str(root.given / rel), plan.mirror(root, rel)))
            if batch:
                yield batch

    def _note(self, path: Path, *, deleted: bool, now: float) -> None:
        if deleted:
            self.settler.forget(path)
            return
        if path.is_dir() and not path.is_symlink():
            # a directory moved in whole: its files raise no events of their own
            if self.recursive and self._walkable(path):
                for rel in walk_images(path, recursive=True, exclude=self.exclude):
                    self._note(path / rel, deleted=False, now=now)
            return
        if self.root_of(path) is not None:
            self.settler.observe(path, now)

    def _walkable(self, directory: Path) -> bool:
        """Whether the walk of some root would enter ``directory``."""
        if self.exclude is not None and directory.is_relative_to(self.exclude):
            return False
        for root in self.roots:
            if directory.is_relative_to(root.path):
                rel = directory.relative_to(root.path)
                return not any(part.startswith(".") for part in rel.parts)
        return False

    def close(self) -> None:
        """Stop the OS watch."""
        self._changes.close()
