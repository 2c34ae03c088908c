"""Back-pressure: a memory budget for the requests a process holds, and a deadline for starting the kernels.

**Memory budget** (``LABELQ_MAX_INFLIGHT_BYTES``, per worker process). Each
request with a body reserves its estimated memory before it allocates it, and
gives it back when its response has been sent:

1. when the request arrives: twice its ``Content-Length``, the chunks as
   received and the body they are joined into (a chunked body reserves as
   its chunks arrive);
2. before decoding: a JSON body, the body plus 64 bytes per number in it
   (numbers are counted by their commas; the measured cost of msgspec's lists
   of Python floats and the float64 array is about 50 bytes each); an npz,
   the body plus twice the arrays its headers declare (zipfile reads a
   member's data into one buffer and copies it into the next);
3. before the kernels, once N and K are known: the body, the arrays, and the
   working memory and answer (:func:`compute_bytes`).

A request that does not fit beside the others gets ``503`` with
``Retry-After`` at once (it does not wait for memory); one that could never fit
(more than the whole budget) gets ``413``. The reservations are estimates, not
accounting: transient copies (litestar joining body chunks, encoding the
answer) come on top, which is why the default budget is half the memory.

**Kernel deadline** (``LABELQ_REQUEST_TIMEOUT_SECONDS``). One request's kernels
run at a time in a process (numba's default threading layer must not be
entered twice). :func:`install_kernel_gate` replaces the in-process API's
kernel lock by a first-come-first-served :class:`KernelGate` whose waiters
give up at their request's deadline: the time its body arrived plus the
timeout. A request still decoding or queueing then gets ``503`` with
``Retry-After`` (:class:`~service.errors.KernelTimeout`). Kernels that have
started are never interrupted (numba code cannot be), so a request can take
longer than the timeout in all: upload + at most the timeout + its kernels +
encoding. Callers outside a request (the warm-up, the in-process API) wait
without a deadline.

Every rejection is counted in ``labelq_rejected_requests_total{reason}``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from service import core
from service.errors import KernelTimeout, Overloaded, PayloadTooLarge, UnsupportedMediaType

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

#: What a 503 tells the client to wait before retrying, in seconds.
RETRY_AFTER_SECONDS = 2
#: Bytes per JSON number while a body is decoded (Python float in a list, then float64), measured ~50.
JSON_BYTES_PER_VALUE = 64
#: Bytes per example of working memory and answer (measured 32 to 77 for the endpoints; x2).
BYTES_PER_EXAMPLE = 160
#: Bytes per K x K cell besides the per-chunk count buffers (matrices, their JSON encoding).
BYTES_PER_PAIR = 32
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_COUNT_CHUNK = 1 << 22


# --------------------------------------------------------------------------
# Budget and reservations
# --------------------------------------------------------------------------


class MemoryBudget:
    """A byte budget shared by the requests of one process (thread-safe)."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit = int(limit)
        self.used = 0
        self._lock = threading.Lock()
        self._gauge = gauge

    def try_take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
        if self._gauge is not None:
            self._gauge.inc(n)
        return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.used -= n
        if self._gauge is not None:
            self._gauge.dec(n)


class Reservation:
    """What one request holds of a :class:`MemoryBudget`; :meth:`resize` sets a new total."""

    def __init__(self, budget: MemoryBudget, on_reject: Any = None) -> None:
        self.budget = budget
        self.held = 0
        self._on_reject = on_reject or (lambda reason: None)
        self._lock = threading.Lock()

    def resize(self, total: int, field: str, what: str) -> None:
        """Hold ``total`` bytes from now on (``what`` says what for, in errors).

        Raises:
            PayloadTooLarge (413): ``total`` exceeds the whole budget.
            Overloaded (503, Retry-After): it does not fit beside the other requests now.
        """
        total = int(total)
        with self._lock:
            if total > self.budget.limit:
                self._on_reject("too_large")
                raise PayloadTooLarge(
                    f"{what} needs about {_mib(total)} of memory, more than this process's whole budget of "
                    f"{_mib(self.budget.limit)} (LABELQ_MAX_INFLIGHT_BYTES)",
                    field,
                )
            delta = total - self.held
            if delta <= 0:
                self.budget.give_back(-delta)
            elif not self.budget.try_take(delta):
                self._on_reject("memory")
                raise Overloaded(
                    f"{what} needs about {_mib(total)} of memory and the requests in flight hold "
                    f"{_mib(self.budget.used)} of {_mib(self.budget.limit)} (LABELQ_MAX_INFLIGHT_BYTES); "
                    f"retry after {RETRY_AFTER_SECONDS} s",
                    field,
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self.held = total

    def release(self) -> None:
        with self._lock:
            if self.held:
                self.budget.give_back(self.held)
                self.held = 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------


def count_json_values(body: bytes) -> int:
    """An upper bound of the numbers in a JSON body: its commas plus one
    (every value but the last of an array is followed by one). numpy, in
    chunks: about 5 ms for 20 MB."""
    raw = np.frombuffer(body, np.uint8)
    commas = 0
    for start in range(0, raw.size, _COUNT_CHUNK):
        commas += int(np.count_nonzero(raw[start : start + _COUNT_CHUNK] == 44))
    return commas + 1


def json_decode_bytes(body: bytes) -> int:
    """Peak memory of decoding a JSON body, the body included."""
    return len(body) + JSON_BYTES_PER_VALUE * count_json_values(body)


def arrays_bytes(shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Bytes of the arrays an npz declares (shape, dtype per array)."""
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in shapes.values())


#: Copies of the body while it is received (the chunks, then the joined body).
BODY_COPIES = 2
#: Copies of an npz member's data while it is read.
NPZ_READ_COPIES = 2


def compute_bytes(n: int, k: int, threads: int, pairwise: bool = True) -> int:
    """Working memory and answer of one computation on N x K (the arrays not
    included): per example, and per pair of classes the K x K count buffers of
    the parallel chunks (``core._n_chunks``: up to 8 per thread) plus the
    matrices and their encoding (``pairwise``; not for out-of-distribution)."""
    per_pair = 8 * max(1, min(n, 8 * threads)) + BYTES_PER_PAIR if pairwise else 0
    return BYTES_PER_EXAMPLE * n + per_pair * k * k + 64 * k + (64 << 10)


# --------------------------------------------------------------------------
# The kernel gate
# --------------------------------------------------------------------------


class KernelGate:
    """A lock, first come first served, that a waiter can give up on.

    A drop-in for the in-process API's kernel lock (``with gate: ...``):
    within a request (:data:`_ticket` set) ``__enter__`` waits until the
    request's deadline at most and then raises
    :class:`~service.errors.KernelTimeout`; elsewhere it waits as long as it
    takes. Ownership is handed from one holder to the next waiter directly,
    so no thread can overtake the queue.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy = False
        self._waiters: deque[threading.Event] = deque()

    def acquire(self, timeout: float | None = None) -> bool:
        with self._mutex:
            if not self._busy and not self._waiters:
                self._busy = True
                return True
            if timeout is not None and timeout <= 0:
                return False
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._mutex:
            if turn.is_set():  # handed over just as the wait timed out: ours after all
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if not self._busy:
                raise RuntimeError("release of an unheld KernelGate")
            if self._waiters:
                self._waiters.popleft().set()  # stays busy: now the next waiter's
            else:
                self._busy = False

    def locked(self) -> bool:
        return self._busy

    def waiting(self) -> int:
        return len(self._waiters)

    def __enter__(self) -> Self:
        ticket = _ticket.get()
        if ticket is None or ticket.deadline is None:
            self.acquire()
            return self
        if not self.acquire(ticket.deadline - time.monotonic()):
            ticket.limits.rejected("timeout")
            raise KernelTimeout(
                f"the request's kernels could not start within {ticket.limits.timeout:g} s of its body arriving "
                f"(LABELQ_REQUEST_TIMEOUT_SECONDS): other requests hold this process's kernels; retry after "
                f"{RETRY_AFTER_SECONDS} s",
                None,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_install_lock = threading.Lock()


def install_kernel_gate() -> KernelGate:
    """Make the in-process API's kernel lock (``core._KERNEL_LOCK``, which
    every endpoint's kernels take) a :class:`KernelGate`, once per process."""
    with _install_lock:
        gate = core._KERNEL_LOCK
        if not isinstance(gate, KernelGate):
            if gate.locked():
                raise RuntimeError("the kernel lock is held; install the gate before serving")
            gate = KernelGate()
            core._KERNEL_LOCK = gate
        return gate


# --------------------------------------------------------------------------
# Per app and per request
# --------------------------------------------------------------------------


class Limits:
    """One app's limits: its budget, its timeout, its metrics."""

    def __init__(
        self, budget_bytes: int, timeout: float, threads: int, registry: CollectorRegistry | None = None
    ) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.timeout = float(timeout)
        self.threads = max(1, int(threads))
        self._rejected = Counter(
            "labelq_rejected_requests_total",
            "Requests refused by the limits: `memory` (503, the budget is in use), `timeout` (503, the kernels "
            "could not start in time), `too_large` (413, more than the whole budget).",
            ["reason"],
            registry=r,
        )
        for reason in ("memory", "timeout", "too_large"):
            self._rejected.labels(reason)
        Gauge(
            "labelq_inflight_budget_bytes",
            "The memory budget for requests in flight (LABELQ_MAX_INFLIGHT_BYTES; summed over live workers).",
            registry=r,
            multiprocess_mode="livesum",
        ).set(budget_bytes)
        reserved = Gauge(
            "labelq_inflight_reserved_bytes",
            "Memory reserved by the requests in flight (estimates; summed over live workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.budget = MemoryBudget(budget_bytes, reserved)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()


@dataclass
class Ticket:
    """One request's admission: its reservation and, once its body has arrived, its deadline."""

    limits: Limits
    reservation: Reservation
    deadline: float | None = None
    body_bytes: int = 0


_ticket: ContextVar[Ticket | None] = ContextVar("labelq_admission", default=None)


def admit(total: int, field: str, what: str) -> None:
    """Hold ``total`` bytes for the current request (see :meth:`Reservation.resize`);
    a no-op outside a request."""
    ticket = _ticket.get()
    if ticket is not None:
        ticket.reservation.resize(total, field, what)


def admit_json(body: bytes) -> None:
    """Before decoding a JSON body."""
    if _ticket.get() is not None:
        admit(json_decode_bytes(body), "body", "decoding this JSON body")


def admit_npz(body_bytes: int, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Before reading the arrays of an npz body (their headers read)."""
    admit(body_bytes + NPZ_READ_COPIES * arrays_bytes(shapes), "pred_probs", "reading these arrays")


def admit_compute(body_bytes: int, arrays: list[np.ndarray | None], pairwise: bool = True) -> None:
    """Before the kernels: the body, the decoded arrays and the computation's memory."""
    ticket = _ticket.get()
    if ticket is None:
        return
    P = arrays[-1]
    if P is None or P.ndim != 2:
        return
    n, k = P.shape
    held = body_bytes + sum(a.nbytes for a in arrays if a is not None)
    admit(held + compute_bytes(n, k, ticket.limits.threads, pairwise), "pred_probs",
          f"computing on {n} x {k}")  # fmt: skip


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class AdmissionMiddleware:
    """Litestar middleware (app-wide): for every request with a body, refuse
    a ``Content-Encoding`` (415: bodies are read as sent), reserve the body in
    the memory budget as it arrives, start the kernel deadline once it has
    arrived, and give the reservation back when the response is sent."""

    def __init__(self, app: ASGIApp, limits: Limits, max_body_bytes: int) -> None:
        self.app = app
        self.limits = limits
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        encoding = (_header(scope, b"content-encoding") or "").strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding!r} is not supported: send the body uncompressed "
                "(an npz body may use numpy.savez_compressed)",
                "Content-Encoding",
            )
        limits = self.limits
        ticket = Ticket(limits, Reservation(limits.budget, limits.rejected))
        expects_continue = (_header(scope, b"expect") or "").strip().lower() == "100-continue"
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) <= self.max_body_bytes:
            # Refused at once if it does not fit, before the body is stored. (Over the body limit,
            # litestar answers 413 when the body is read; a chunked body is reserved as it arrives.)
            try:
                ticket.reservation.resize(BODY_COPIES * int(length), "body", "receiving this body")
            except (Overloaded, PayloadTooLarge):
                await _discard_body(receive, expects_continue)
                raise

        async def admitting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                ticket.body_bytes += len(message.get("body", b""))
                if BODY_COPIES * ticket.body_bytes > ticket.reservation.held:
                    try:
                        ticket.reservation.resize(BODY_COPIES * ticket.body_bytes, "body", "receiving this body")
                    except (Overloaded, PayloadTooLarge):
                        if message.get("more_body", False):
                            await _discard_body(receive, False)
                        raise
                if not message.get("more_body", False) and ticket.deadline is None:
                    ticket.deadline = time.monotonic() + limits.timeout
            return message

        token = _ticket.set(ticket)
        try:
            await self.app(scope, admitting_receive, send)  # type: ignore[arg-type]
        finally:
            _ticket.reset(token)
            ticket.reservation.release()


async def _discard_body(receive: Receive, expects_continue: bool) -> None:
    """Read and drop the rest of a refused request's body, so that the client,
    still sending it, reads the answer instead of a reset connection. Not
    when the client waits for ``100 Continue`` (it has sent nothing yet)."""
    if expects_continue:
        return
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def auto_budget(workers: int) -> int:
    """The default budget of one worker: half of the memory limit (the
    cgroup's, else the machine's), divided among the workers."""
    return max(64 << 20, memory_limit() // 2 // max(1, workers))


def memory_limit() -> int:
    """The memory this process may use: the cgroup (v2, else v1) limit, capped by physical memory."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 4 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
        break
    return total
