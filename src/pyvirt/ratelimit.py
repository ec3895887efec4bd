"""Token-bucket rate limiters on the VM clock, as Firecracker's.

A `TokenBucket` holds at most `size` tokens and refills at `rate` tokens per
second of VM time (so it stands still while the VM is paused).  A one-time
`burst` is spent before the bucket and never refills.  Arithmetic is exact:
the balance is kept in token-ticks (tokens x clock hz), so refilling over
`t` ticks adds `t x rate` and taking `n` tokens costs `n x hz`.

One request may cost more than `size` (a 1 MiB write against a 512 KiB
bucket): it is let through once the bucket is full and leaves the bucket in
debt, so the long-run rate still holds and no request waits forever.

A `RateLimiter` pairs a bandwidth bucket (bytes) with an ops bucket
(requests); `consume()` takes from both or from neither.  A device that is
refused leaves its request where it was and asks again after `ready_at()`,
the clock tick the board's `next_deadline()` wakes an idle VM for.
"""

from __future__ import annotations

from typing import Protocol


class TickClock(Protocol):
    hz: int

    def ticks(self) -> int: ...


class TokenBucket:
    def __init__(self, clock: TickClock, rate: int, size: int | None = None, burst: int = 0) -> None:
        if rate <= 0:
            raise ValueError("a token bucket's rate must be positive")
        self.clock = clock
        self.rate = int(rate)
        self.size = max(1, int(size if size is not None else self.rate // 10))   # 100 ms worth
        if burst < 0:
            raise ValueError("a one-time burst cannot be negative")
        self.burst = int(burst)
        self._balance = self.size * clock.hz          # token-ticks; negative: in debt
        self._last = clock.ticks()

    def _refill(self) -> None:
        now = self.clock.ticks()
        if now > self._last:
            cap = self.size * self.clock.hz
            self._balance = min(cap, self._balance + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def tokens(self) -> int:
        """Whole tokens available now (the one-time burst not counted)."""
        self._refill()
        return max(0, self._balance // self.clock.hz)

    def consume(self, n: int) -> bool:
        """Take `n` tokens if they are there (see the module note on oversized requests)."""
        return self._take(n, commit=True)

    def can(self, n: int) -> bool:
        return self._take(n, commit=False)

    def _take(self, n: int, commit: bool) -> bool:
        if n <= 0:
            return True
        self._refill()
        from_burst = min(n, self.burst)
        cost = (n - from_burst) * self.clock.hz
        cap = self.size * self.clock.hz
        if cost and not (cost <= self._balance or (cost > cap and self._balance >= cap)):
            return False
        if commit:
            self.burst -= from_burst
            self._balance -= cost
        return True

    def ready_at(self, n: int) -> int:
        """The clock tick at which `n` tokens can be taken."""
        self._refill()
        cost = (n - min(n, self.burst)) * self.clock.hz
        need = min(cost, self.size * self.clock.hz) - self._balance
        if need <= 0:
            return self._last
        return self._last + -(-need // self.rate)


class RateLimiter:
    """A bandwidth bucket (bytes) and an ops bucket (requests); either may be absent."""

    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None) -> None:
        self.bandwidth = bandwidth
        self.ops = ops
        self._wanted: tuple[int, int] | None = None     # the refused request, until it passes
        self.throttled = 0                               # refusals, for stats

    @classmethod
    def build(cls, clock: TickClock, bw: int | None = None, ops: int | None = None,
              burst: int = 0) -> RateLimiter | None:
        """None when no limit is set (the device then never asks)."""
        if not bw and not ops:
            return None
        return cls(TokenBucket(clock, bw, burst=burst) if bw else None,
                   TokenBucket(clock, ops, size=max(1, ops // 10)) if ops else None)

    def consume(self, nbytes: int, ops: int = 1) -> bool:
        b, o = self.bandwidth, self.ops
        if (b is None or b.can(nbytes)) and (o is None or o.can(ops)):
            if b is not None:
                b.consume(nbytes)
            if o is not None:
                o.consume(ops)
            self._wanted = None
            return True
        self._wanted = (nbytes, ops)
        self.throttled += 1
        return False

    @property
    def blocked(self) -> bool:
        return self._wanted is not None

    def _now(self) -> int:
        bucket = self.bandwidth or self.ops
        assert bucket is not None
        return bucket.clock.ticks()

    def due(self) -> bool:
        """A refused request is waiting and its tokens are there now."""
        at = self.ready_at()
        return at is not None and at <= self._now()

    def wake_at(self) -> int | None:
        """A deadline for the board: the future tick a refused request can pass.  None once
        that time has come (the device's poll retries then; if it is now waiting for
        something else -- guest buffers, a kick -- that wakes the VM by other means)."""
        at = self.ready_at()
        return at if at is not None and at > self._now() else None

    def ready_at(self) -> int | None:
        """When the last refused request can pass; None if nothing is waiting."""
        if self._wanted is None:
            return None
        nbytes, ops = self._wanted
        ticks = [t.ready_at(n) for t, n in ((self.bandwidth, nbytes), (self.ops, ops)) if t is not None]
        return max(ticks)
