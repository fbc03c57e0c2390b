"""Fault-proof downloads: retries with backoff, resumable transfers, hash checks, verify-then-rename.

A file only ever appears at its final path complete and verified: the `verify(path)` callback (e.g. "the
parquet footer reads and has rows") runs before the atomic rename. A file that fails verification is deleted
and fetched again a bounded number of times, never trusted.

Two transports behind one job list (download_many):
- Hugging Face hub files (DownloadJob.hub) go through `huggingface_hub.hf_hub_download` at a pinned
  revision: HF_TOKEN for gated repos, HF_HUB_OFFLINE=1, HF_ENDPOINT, and its Xet path where the hub offers it.
  The file lands in a hidden staging folder beside `dest`, is checked against the sha256 the hub reports
  for it (the ETag of LFS files), verified, then renamed into place. A transfer cut short resumes within the
  run (huggingface_hub's own Range resume); a killed process starts that file again.
- Any other URL (the eval bundle, the word list): plain HTTP with `requests`; bytes stream into
  `<dest>.partial`, and an interrupted transfer resumes from there with a Range request, across runs too.
"""

import email.utils
import errno
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
import urllib3

from nanopipe.common import file_sha256
from nanopipe.progress import Progress

# Statuses worth another try: the server is overloaded or hiccuped, not telling us the file is absent.
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 900.0  # seconds; a longer Retry-After is capped to this
# Transport failures worth another try (resets, timeouts, bodies cut short); the body is read through
# urllib3 directly, so its errors arrive unwrapped.
RETRY_EXCEPTIONS = (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, ConnectionError,
                    TimeoutError)


COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


class DownloadError(Exception):
    """A download that failed for good; carries the URL and a one-line reason."""

    def __init__(self, url, reason):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class _Cancelled(BaseException):
    """Raised inside a worker when the user interrupted download_many (a BaseException: no retry catches it)."""


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying; `wait` is the server's Retry-After, if any."""

    def __init__(self, reason, wait=None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


def partial_path(dest) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".partial")


def _retry_after_seconds(value):
    """Parse a Retry-After header: delay-seconds or an HTTP date. None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _check_verify(verify, path):
    """Run the verify callback; returns None when the file is good, else the reason it is not."""
    if verify is None:
        return None
    try:
        ok = verify(path)
    except Exception as e:  # any failure of the check means the file cannot be trusted
        return f"verification failed: {type(e).__name__}: {e}"
    return None if ok is None or ok else "verification failed"


def _fetch_once(session, url, part, timeout, chunk_size, progress):
    """One HTTP attempt that extends `part` towards the full file, calling progress(nbytes) as bytes arrive.

    Raises _Retry for transient failures (the partial file stays for the next attempt to resume)
    and DownloadError for permanent ones.
    """
    offset = part.stat().st_size if part.exists() else 0
    # identity: a gzip-encoded body would make Content-Length and Range count compressed bytes
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 416 and offset:
                # our partial is at least as long as the file: trust only an exact length match
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit() and int(total) == offset:
                    return
                part.unlink()
                raise _Retry(f"HTTP 416 for a {offset}-byte partial file, restarting")
            if r.status_code in RETRY_STATUSES:
                raise _Retry(f"HTTP {r.status_code} {r.reason}", _retry_after_seconds(r.headers.get("Retry-After")))
            if r.status_code >= 400:
                raise DownloadError(url, f"HTTP {r.status_code} {r.reason}")
            if r.status_code == 206:
                start, _, total = r.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
                if not start.startswith(f"{offset}-"):
                    part.unlink()
                    raise _Retry(f"server answered Range {offset}- with {r.headers.get('Content-Range')!r}, restarting")
                expected = int(total) if total.isdigit() else None
                mode = "ab"
            elif r.status_code == 200:
                # a server that ignores Range sends the whole file again: start over from byte 0
                expected = int(r.headers["Content-Length"]) if r.headers.get("Content-Length", "").isdigit() else None
                mode = "wb"
            else:
                raise DownloadError(url, f"unexpected HTTP {r.status_code} {r.reason}")
            with open(part, mode) as f:
                # read1 hands over whatever has arrived, so a reset loses nothing already received
                # (iter_content would drop a partly filled chunk)
                while chunk := r.raw.read1(chunk_size):
                    f.write(chunk)
                    progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
    except RETRY_EXCEPTIONS as e:
        raise _Retry(f"{type(e).__name__}: {e}") from e
    size = part.stat().st_size
    if expected is not None and size != expected:
        if size > expected:
            part.unlink()
        raise _Retry(f"size mismatch: have {size} bytes, server said {expected}")


class _Tally:
    """A progress callback that counts the bytes of one download and passes each count on to `progress`."""

    def __init__(self, progress=None):
        self.bytes, self.progress = 0, progress

    def __call__(self, nbytes):
        self.bytes += nbytes
        if self.progress is not None:
            self.progress(nbytes)


def download_file(url, dest, verify=None, retries=5, backoff=1.0, max_backoff=60.0, timeout=30.0,
                  max_corrupt=2, chunk_size=1 << 20, session=None, progress=None):
    """Download `url` to `dest`, robustly. Returns the number of bytes transferred (0 if already there).

    verify: callable(path) that raises (or returns False) when the file is bad; runs on the complete
        partial file before the rename, and on an existing `dest` to decide whether to skip it.
    retries: transient failures tolerated (5xx/429/408, resets, timeouts, truncated bodies); waits are
        backoff * 2**k seconds capped at max_backoff, or the server's Retry-After when it sends one
        (capped at MAX_RETRY_AFTER).
    max_corrupt: how many complete-but-unverifiable files to discard before giving up.
    progress: callable(nbytes) fed as bytes arrive (download_many drives its Progress with it).
    Raises DownloadError(url, reason) when the file cannot be had; a 404 is not retried.
    """
    dest = Path(dest)
    if dest.exists():
        if _check_verify(verify, dest) is None:
            return 0
        dest.unlink()  # a bad file at the final path is never trusted: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    session = session or requests.Session()
    received = _Tally(progress)

    def attempt():
        _fetch_once(session, url, part, timeout, chunk_size, received)
        problem = _check_verify(verify, part)
        if problem is None:
            os.replace(part, dest)
        else:
            part.unlink()
        return problem

    _retrying(url, attempt, retries, backoff, max_backoff, max_corrupt)
    return received.bytes


def _retrying(url, attempt, retries, backoff, max_backoff, max_corrupt):
    """Call attempt() until the file is in place: it raises _Retry for a transient failure (tolerated `retries`
    times, waited out as download_file says) and returns the reason a complete file was bad and discarded
    (tolerated `max_corrupt` times), or None once the file is at its final path."""
    failures = corrupt = 0
    while True:
        try:
            problem = attempt()
        except _Retry as e:
            failures += 1
            if failures > retries:
                raise DownloadError(url, f"gave up after {failures} attempts, last: {e.reason}") from None
            if e.wait is not None:  # the server said when: believe it, within reason
                time.sleep(min(e.wait, MAX_RETRY_AFTER))
            else:
                time.sleep(min(backoff * 2 ** (failures - 1), max_backoff))
            continue
        if problem is None:
            return
        corrupt += 1
        if corrupt > max_corrupt:
            raise DownloadError(url, f"{problem} (on {corrupt} complete downloads)")


# ---------------------------------------------------------------------------------------------
# Hugging Face hub files

@dataclass
class HubFile:
    repo_id: str
    filename: str
    revision: str  # a commit sha: every request names it, so a re-shard upstream cannot mix into a dataset
    repo_type: str = "dataset"

    @property
    def url(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{hf_endpoint()}/{kind}{self.repo_id}/resolve/{self.revision}/{self.filename}"


def hub_offline() -> bool:
    from huggingface_hub import constants
    return constants.is_offline_mode()


def _hub_failure(e: Exception, url: str):
    """A huggingface_hub exception as _Retry (worth another try) or DownloadError (permanent)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
    if isinstance(e, OfflineModeIsEnabled) or (isinstance(e, LocalEntryNotFoundError) and hub_offline()):
        return DownloadError(url, "HF_HUB_OFFLINE=1 is set and the file is not on disk: unset it to download")
    if isinstance(e, (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)) or (
            isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code not in RETRY_STATUSES):
        status = e.response.status_code if getattr(e, "response", None) is not None else "?"
        hint = " (a gated or private repo: set HF_TOKEN)" if status in (401, 403) else ""
        return DownloadError(url, f"HTTP {status} {str(e).splitlines()[0]}{hint}")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return _Retry(f"HTTP {e.response.status_code}", _retry_after_seconds(e.response.headers.get("Retry-After")))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
        raise e  # the disk, not the network: no retry helps
    return _Retry(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def resolve_revision(repo_id: str, revision: str = "main", repo_type: str = "dataset", retries: int = 5,
                     backoff: float = 1.0) -> str:
    """The commit sha a branch or tag names now (a sha is returned as it is; offline nothing is asked)."""
    if COMMIT_SHA.fullmatch(revision) or hub_offline():
        return revision
    from huggingface_hub import HfApi
    url = f"{hf_endpoint()}/api/{repo_type}s/{repo_id}/revision/{revision}"
    for attempt in range(retries + 1):
        try:
            return HfApi(endpoint=hf_endpoint()).repo_info(repo_id, repo_type=repo_type, revision=revision).sha
        except Exception as e:  # noqa: BLE001 (classified: permanent ones raise, the rest are retried)
            failure = _hub_failure(e, url)
            if isinstance(failure, DownloadError) or attempt == retries:
                raise DownloadError(url, failure.reason) from None
            time.sleep(failure.wait if failure.wait is not None else backoff * 2 ** attempt)



def retry_kwargs(download_kwargs) -> dict:
    """The retry settings among download_many's keyword arguments, for the resolve_revision before it."""
    return {k: download_kwargs[k] for k in ("retries", "backoff") if k in download_kwargs}


def _progress_bar_class(progress):
    """A silent tqdm for huggingface_hub that feeds its byte counts to download_many's bar."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Forward(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if progress is not None and n:
                progress(n)

    return Forward


def download_hub_file(hub: HubFile, dest, verify=None, retries=5, backoff=1.0, max_backoff=60.0, timeout=30.0,
                      max_corrupt=2, progress=None, **_):
    """download_file for a hub file, through hf_hub_download. Returns the bytes transferred (0 if present)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download
    dest = Path(dest)
    if dest.exists():
        if _check_verify(verify, dest) is None:
            return 0  # no request at all, online or offline
        dest.unlink()
    staging = dest.parent / f".{dest.name}.hub"  # hf_hub_download's local_dir
    received = _Tally(progress)
    url = hub.url

    def attempt():
        try:
            meta = get_hf_file_metadata(url, timeout=timeout)
            path = Path(hf_hub_download(hub.repo_id, hub.filename, repo_type=hub.repo_type, revision=hub.revision,
                                        local_dir=staging, endpoint=hf_endpoint(), etag_timeout=timeout,
                                        tqdm_class=_progress_bar_class(received)))
        except Exception as e:  # noqa: BLE001 (classified: _Retry is retried, DownloadError is final)
            raise _hub_failure(e, url) from None
        problem = None
        etag = (meta.etag or "").strip('"')
        if SHA256.fullmatch(etag) and file_sha256(path) != etag:
            problem = f"sha256 mismatch: the hub says {etag[:12]}…"
        problem = problem or _check_verify(verify, path)
        if problem is None:
            os.replace(path, dest)
        shutil.rmtree(staging, ignore_errors=True)  # a bad file and hf_hub's record of it: fetch it anew
        return problem

    try:
        _retrying(url, attempt, retries, backoff, max_backoff, max_corrupt)
    except DownloadError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return received.bytes


@dataclass
class DownloadJob:
    url: str
    dest: Path
    verify: object = None  # callable(path) or None
    hub: HubFile | None = None  # a hub file: fetched through huggingface_hub (url is then hub.url)


@dataclass
class DownloadResult:
    job: DownloadJob
    ok: bool
    nbytes: int = 0  # bytes transferred by this run (0 when the file was already there)
    skipped: bool = False
    reason: str = ""


@dataclass
class DownloadSummary:
    results: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self):
        return [r for r in self.results if r.ok]

    @property
    def failed(self):
        return [r for r in self.results if not r.ok]

    @property
    def nbytes(self):
        return sum(r.nbytes for r in self.results)

    def format(self):
        skipped = sum(r.skipped for r in self.results)
        mb = self.nbytes / 1e6
        lines = [f"downloads: {len(self.ok)} ok ({skipped} already present), {len(self.failed)} failed, "
                 f"{mb:.1f} MB in {self.seconds:.1f}s ({mb / max(self.seconds, 1e-9):.1f} MB/s)"]
        lines += [f"  FAILED {r.job.url}: {r.reason}" for r in self.failed]
        return "\n".join(lines)


def download_many(jobs, workers=4, show_progress=True, **kwargs):
    """Download DownloadJobs in a thread pool, in order of submission (early files land first).

    Never raises for a failed file: each outcome is in the returned DownloadSummary (print .format()).
    kwargs go to download_file (retries, backoff, timeout, ...).
    """
    jobs = list(jobs)
    summary = DownloadSummary()
    bar = Progress(None, f"0/{len(jobs)} files", enabled=show_progress, nbytes=True)
    lock = threading.Lock()
    stop = threading.Event()
    done = 0

    def progress(nbytes):
        if stop.is_set():
            raise _Cancelled  # unwinds this transfer; its partial file stays for a later resume
        bar.update(nbytes)

    def run(job):
        nonlocal done
        if stop.is_set():  # dequeued in the instant before a Ctrl-C cancelled the queue
            raise _Cancelled
        try:
            if job.hub is None:
                nbytes = download_file(job.url, job.dest, verify=job.verify, progress=progress, **kwargs)
            else:
                nbytes = download_hub_file(job.hub, job.dest, verify=job.verify, progress=progress, **kwargs)
            result = DownloadResult(job, ok=True, nbytes=nbytes, skipped=nbytes == 0)
        except DownloadError as e:
            result = DownloadResult(job, ok=False, reason=e.reason)
        except OSError as e:  # disk full, permissions: report it against the file, keep the others going
            result = DownloadResult(job, ok=False, reason=f"{type(e).__name__}: {e}")
        with lock:
            done += 1
            bar.set_description(f"{done}/{len(jobs)} files")
        return result

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        summary.results = list(pool.map(run, jobs))
    except KeyboardInterrupt:
        # Ctrl-C: queued files never start, running ones stop at their next chunk. The queue goes first: a
        # transfer told to stop frees its worker, which would otherwise take the next queued file.
        pool.shutdown(wait=False, cancel_futures=True)
        stop.set()
        bar.close(done=False)
        raise
    pool.shutdown()
    summary.seconds = time.perf_counter() - t0
    bar.close()
    return summary
