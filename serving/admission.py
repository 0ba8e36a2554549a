"""Admission control in front of the model: how many request bytes the service holds at once, and the answer a
request gets when there is no room (503, a message naming the limit and its setting, and Retry-After).

Memory then grows with the work the model can do, not with the number of clients: a request's bytes
(Content-Length, counted before its body is read; without one, the largest body allowed) are reserved when it
arrives and released when it has been answered. Decoding images holds memory too: what decoding a request's
largest image will hold (known from its header, serving/images.py) is reserved in the same budget while it decodes.
Requests of at most SMALL_BYTES (an image or a few, a small batch) may also use a reserve that bulk uploads cannot,
so interactive traffic gets through a burst of uploads.
"""
import collections
import math
import time

SMALL_BYTES = 1 << 20      # up to here a request counts as small (256 images as .npy are 0.75 MB)
DRAIN_WINDOW_S = 10.0      # the drain rate behind Retry-After is measured over this window


class Overloaded(Exception):
    """The service refuses a request for now: HTTP 503 with this message and Retry-After: retry_after seconds."""
    status = 503

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = max(1, min(60, math.ceil(retry_after)))


class ByteBudget:
    """Request bytes accepted and not yet answered, against a limit. Used from one event loop: no locks."""

    def __init__(self, limit, reserve, clock=time.monotonic):
        self.limit, self.reserve, self.in_flight, self.clock = limit, reserve, 0, clock
        self.answered = collections.deque()   # (time, bytes) of the requests answered in the last DRAIN_WINDOW_S

    @classmethod
    def for_requests(cls, limit, largest):
        """A budget of LIMIT bytes whose small requests keep a tenth of it (at least 16 MB) that bulk uploads cannot
        take, as long as a request of the LARGEST size still fits."""
        return cls(limit, min(max(limit // 10, 16 << 20), limit - largest))

    def room(self, nbytes):
        """The most that may be in flight once nbytes more are admitted."""
        return self.limit if nbytes <= SMALL_BYTES else self.limit - self.reserve

    def admit(self, nbytes, what="this one"):
        """Take nbytes of the budget, or raise Overloaded (WHAT names what would pass the limit)."""
        room = self.room(nbytes)
        if self.in_flight + nbytes > room:
            raise Overloaded(f"server busy: {self.in_flight / 2**20:.0f} MB of requests in flight, {what} would pass "
                             f"the limit of {room / 2**20:.0f} MB for requests of its size (CIFAR100_MAX_INFLIGHT_MB); "
                             "retry later", self.seconds_to_free(self.in_flight + nbytes - room))
        self.in_flight += nbytes

    def release(self, nbytes):
        self.in_flight -= nbytes
        self.answered.append((self.forget_old(), nbytes))   # or every request ever answered would stay in the deque

    def forget_old(self):
        """Drop the answers older than the window; return the time now."""
        now = self.clock()
        while self.answered and self.answered[0][0] < now - DRAIN_WINDOW_S:
            self.answered.popleft()
        return now

    def seconds_to_free(self, nbytes):
        """How long until nbytes more have been answered, at the rate of the last DRAIN_WINDOW_S (1 s when unknown)."""
        now = self.forget_old()
        drained = sum(n for _, n in self.answered)
        if not drained:
            return 1.0
        return nbytes / (drained / max(now - self.answered[0][0], 1.0))
