"""Choosing the draft length g from the measured acceptance rate and step times."""
from __future__ import annotations


class DraftLength:
    """Picks g maximising expected tokens per second of a speculative cycle:

        tokens(g) = 1 + b + ... + b^g            (b: per-draft acceptance rate, measured)
        time(g)   = (g + b^g) t_draft + t_verify(g + 1) + t_other

    t_verify(T), the time of one pass of the verifying models over T tokens, is a least-squares
    line through the measured passes; every measurement is an exponential moving average, so g
    follows the text as its predictability changes. When no g beats plain fused decoding
    (1 / (t_draft + t_verify(1) + t_other) tokens per second), g is 0 but for periodic probes.
    """

    def __init__(self, g_max: int = 8, start: tuple[int, ...] = (2, 4), decay: float = 0.9, probe_every: int = 8):
        self.g_max = g_max
        self.start = list(start)
        self.decay = decay
        self.acc, self.trials = 1.0, 2.0        # prior: acceptance 1/2
        self.t_draft: float | None = None
        self.t_other: float = 0.0
        self.t_verify: dict[int, float] = {}
        self.history: list[int] = []
        self.probe_every = probe_every
        self._plain_run = 0

    @staticmethod
    def _ema(old: float | None, new: float, a: float = 0.3) -> float:
        return new if old is None else (1 - a) * old + a * new

    def update(self, accepted: int, trials: int, t_draft_step: float, n_verify: int, t_verify: float,
               t_other: float) -> None:
        """After a cycle: its drafts accepted and tried (0 and 0 for a plain cycle) and its timings."""
        if trials:
            self.acc = self.decay * self.acc + accepted
            self.trials = self.decay * self.trials + trials
        self.t_draft = self._ema(self.t_draft, t_draft_step)
        self.t_verify[n_verify] = self._ema(self.t_verify.get(n_verify), t_verify)
        self.t_other = self._ema(self.t_other, t_other)

    @property
    def rate(self) -> float:
        return min(self.acc / self.trials, 0.999)

    def _verify_time(self, n: int) -> float:
        if n in self.t_verify:  # measured: pass cost need not be linear in n (kernels switch with the row count)
            return self.t_verify[n]
        pts = sorted(self.t_verify.items())
        if not pts:  # nothing measured yet: any unit will do
            return 1.0 + 0.05 * n
        if len(pts) == 1:
            (n0, t0), = pts
            return t0 * (1 + 0.05 * (n - n0))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        slope = max(slope, 0.0)
        return max(my + slope * (n - mx), 1e-6)

    def expected_speed(self, g: int) -> float:
        b = self.rate
        tokens = sum(b ** i for i in range(g + 1))
        return tokens / ((g + b ** g) * (self.t_draft or 0.0) + self._verify_time(g + 1) + self.t_other)

    def plain_speed(self) -> float:
        """Tokens per second without drafting: one step of every model per token."""
        return 1.0 / ((self.t_draft or 0.0) + self._verify_time(1) + self.t_other)

    def next(self) -> int:
        """The next cycle's g; 0 (plain fused decoding) while drafting does not pay, with a
        drafting cycle every ``probe_every`` cycles to keep measuring the acceptance rate."""
        if self.start:
            g = min(self.start.pop(0), self.g_max)
        else:
            g = max(range(1, self.g_max + 1), key=self.expected_speed)
            if self.expected_speed(g) < self.plain_speed() and self._plain_run < self.probe_every:
                g = 0
        self._plain_run = self._plain_run + 1 if g == 0 else 0
        self.history.append(g)
        return g
