"""What a decoding run costs: forward passes, tokens, accepted lengths, wall time."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class DecodeStats:
    """Counters for one decoding run over a batch.

    ``forward_passes`` counts model calls including the condition prefill; ``tokens`` is
    the number of image tokens produced per sample; ``accepted_hist`` maps tokens committed
    in one forward to how often that happened (summed over samples).
    """

    method: str
    batch_size: int
    tokens: int
    forward_passes: int = 0
    wall_s: float = 0.0
    accepted_hist: dict = field(default_factory=dict)
    per_sample_forward_passes: Optional[list] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def combine(cls, parts: list) -> "DecodeStats":
        """One record for a batch decoded in consecutive chunks: counts and times add up."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        hist = Counter()
        for p in parts:
            hist.update(p.accepted_hist)
        per_sample = [n for p in parts for n in (p.per_sample_forward_passes or [])]
        out = cls(method=first.method, batch_size=sum(p.batch_size for p in parts), tokens=first.tokens,
                  forward_passes=sum(p.forward_passes for p in parts), wall_s=sum(p.wall_s for p in parts),
                  accepted_hist=dict(sorted(hist.items())), per_sample_forward_passes=per_sample or None,
                  extra={**first.extra, "chunks": len(parts)})
        out.extra["step_compression"] = out.step_compression  # of the whole batch, not the first chunk
        return out

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forward_passes, 1)

    @property
    def step_compression(self) -> float:
        """Tokens per sample over the mean target passes per sample (prefill included): the one definition."""
        passes = self.per_sample_forward_passes or [self.forward_passes] * self.batch_size
        return self.tokens / max(sum(passes) / len(passes), 1e-9)

    def record_accepted(self, lengths) -> None:
        """Add accepted lengths (an iterable of ints, one per sample) to the histogram."""
        hist = Counter(self.accepted_hist)
        hist.update(int(n) for n in lengths)
        self.accepted_hist = dict(sorted(hist.items()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_forward"] = self.tokens_per_forward
        d["step_compression"] = self.step_compression
        d["accepted_hist"] = {str(k): v for k, v in self.accepted_hist.items()}
        return d

    def to_json(self, path) -> None:
        """Write the stats as JSON (atomically: temporary file, then rename)."""
        from ..atomic import write_atomic

        write_atomic(str(path), json.dumps(self.to_dict(), indent=2))
