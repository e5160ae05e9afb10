"""Choosing the draft length g from the measured acceptance rate and step times."""
from __future__ import annotations


def _line(points: dict[int, float], n: int) -> float | None:
    """The measured value at n, else a least-squares line (slope >= 0) through the measured points."""
    if n in points:  # measured: cost need not be linear in n (kernels switch with the row count)
        return points[n]
    if not points:
        return None
    pts = sorted(points.items())
    if len(pts) == 1:
        (n0, t0), = pts
        return t0 * (1 + 0.05 * (n - n0)) if n0 else t0
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 0.0)
    return max(my + slope * (n - mx), 1e-6)


class DraftLength:
    """Picks g maximising expected tokens per second of a speculative cycle:

        tokens(g) = 1 + b + ... + b^g            (b: per-draft acceptance rate, measured)
        time(g)   = t_draft(g) + t_verify(g + 1) + t_other

    t_draft(g) is the measured time of a cycle's drafting with g drafts (the drafter's steps, its
    output layer, and its step at the bonus position when every draft was accepted); t_verify(T)
    the time of one pass of the verifying models over T tokens. Unmeasured values come from a
    least-squares line through the measured ones (t_draft before any drafting is measured: g + b^g
    plain small-model steps). Every measurement is an exponential moving average, so g follows
    the text as its predictability changes. When no g beats plain fused decoding
    (1 / (t_small + t_verify(1) + t_other) tokens per second, t_small the small models' step), g is
    0 but for periodic probes, every ``probe_every`` plain cycles at first and twice as far apart
    after each probe that still does not pay (up to ``probe_max``): a text where drafts keep losing
    (the KJV SLM at batch 8) stops paying for probes. The first cycles (``start``) measure a plain
    step and two draft lengths: a pass over one token can cost much less than the line through
    longer passes says.
    """

    def __init__(self, g_max: int = 8, start: tuple[int, ...] = (0, 2, 4), decay: float = 0.9, probe_every: int = 8,
                 probe_max: int = 64):
        self.g_max = g_max
        self.start = list(start)
        self.decay = decay
        self.acc, self.trials = 1.0, 2.0        # prior: acceptance 1/2
        self.t_small: float | None = None       # the small models' step in a plain cycle
        self.t_other: float = 0.0
        self.t_draft: dict[int, float] = {}     # drafting time of a cycle with g drafts
        self.t_verify: dict[int, float] = {}
        self.history: list[int] = []
        self.probe_every = probe_every
        self.probe_max = max(probe_max, probe_every)
        self._probe_gap = probe_every
        self._plain_run = 0

    @staticmethod
    def _ema(old: float | None, new: float, a: float = 0.3) -> float:
        return new if old is None else (1 - a) * old + a * new

    def update(self, accepted: int, trials: int, g: int, t_draft: float, n_verify: int, t_verify: float,
               t_other: float) -> None:
        """After a cycle with g drafts (0: a plain cycle, whose t_draft is the small models' step):
        its drafts accepted and tried, and its timings."""
        if trials:
            self.acc = self.decay * self.acc + accepted
            self.trials = self.decay * self.trials + trials
        if g:
            self.t_draft[g] = self._ema(self.t_draft.get(g), t_draft)
        else:
            self.t_small = self._ema(self.t_small, t_draft)
        self.t_verify[n_verify] = self._ema(self.t_verify.get(n_verify), t_verify)
        self.t_other = self._ema(self.t_other, t_other)

    @property
    def rate(self) -> float:
        return min(self.acc / self.trials, 0.999)

    def _verify_time(self, n: int) -> float:
        t = _line(self.t_verify, n)
        return 1.0 + 0.05 * n if t is None else t  # nothing measured yet: any unit will do

    def _draft_time(self, g: int) -> float:
        t = _line(self.t_draft, g)
        if t is None:
            return (g + self.rate ** g) * (self.t_small or 0.0)
        return t

    def expected_speed(self, g: int) -> float:
        b = self.rate
        tokens = sum(b ** i for i in range(g + 1))
        return tokens / (self._draft_time(g) + self._verify_time(g + 1) + self.t_other)

    def plain_speed(self) -> float:
        """Tokens per second without drafting: one step of every model per token."""
        return 1.0 / ((self.t_small or 0.0) + self._verify_time(1) + self.t_other)

    def next(self) -> int:
        """The next cycle's g; 0 (plain fused decoding) while drafting does not pay, with probing
        drafting cycles (ever further apart while they lose) to keep measuring the acceptance rate."""
        if self.start:
            g = min(self.start.pop(0), self.g_max)
        else:
            g = max(range(1, self.g_max + 1), key=self.expected_speed)
            if self.expected_speed(g) >= self.plain_speed():
                self._probe_gap = self.probe_every
            elif self._plain_run < self._probe_gap:
                g = 0
            else:  # a probe; the next one waits twice as long unless drafting pays by then
                self._probe_gap = min(2 * self._probe_gap, self.probe_max)
        self._plain_run = self._plain_run + 1 if g == 0 else 0
        self.history.append(g)
        return g


class DraftSources:
    """One row's record of how often each draft source would have been accepted at the first
    drafted position: the SLM's draft and the copy from its own text, by the length n of the
    matched n-gram. Both are measured at every cycle, whichever drafted, from P and the SLM's
    distribution at that position (greedy: whether each proposal is P's argmax; sampling: the
    probability that it is accepted, sum_v min(P, q) for the SLM and P(d) for a copy d), so neither
    needs a turn to be measured. Exponential moving averages with a prior of one half and a long
    memory (about 50 cycles): the two rates are often close, and a short memory's noise flips the
    choice (bench_generate compared decays). A row's record holds its own text only, so its choices never depend on
    the other rows of a batch."""

    PRIOR = (1.0, 2.0)   # accepted, trials: one half

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self.score: dict = {}   # source ("slm" or a match length) -> [accepted, trials]

    def rate(self, source) -> float:
        acc, trials = self.score.get(source, self.PRIOR)
        return acc / trials

    def prefers_copy(self, n: int) -> bool:
        """Draft the copy of an n-gram match rather than let the SLM draft (ties go to the copy:
        where every row copies, one pass of every model verifies, cheaper than the SLM's steps)."""
        return n > 0 and self.rate(n) >= self.rate("slm")

    def update(self, source, accepted: float) -> None:
        acc, trials = self.score.get(source, self.PRIOR)
        self.score[source] = [self.decay * acc + accepted, self.decay * trials + 1.0]
