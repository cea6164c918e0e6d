"""The app's own Prometheus metrics (Serve's request, latency and queue metrics stay on too).

Ray exports them on each node's metrics port; names and tags are listed in docs/serving.md.
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Histogram


class ModelMetrics:
    """Per model deployment: images answered, those flagged uncertain, and items per batched forward pass."""

    def __init__(self, role: str) -> None:
        # uncertain-prediction rate = rate(uncertain) / rate(predictions), per model (docs/serving.md)
        self.predictions = Counter("flowers_predictions", description="images answered (decoded and classified)",
                                   tag_keys=("model",))
        self.predictions.set_default_tags({"model": role})
        self.uncertain = Counter("flowers_uncertain_predictions",
                                 description="predictions flagged uncertain (entropy above threshold)",
                                 tag_keys=("model",))
        self.uncertain.set_default_tags({"model": role})
        self.batch_size = Histogram("flowers_batch_size", description="items per batched forward pass",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",))
        self.batch_size.set_default_tags({"model": role})

    def record_batch(self, results: list[dict]) -> None:
        self.batch_size.observe(len(results))
        answered = sum(1 for r in results if "error" not in r)
        if answered:
            self.predictions.inc(answered)
        flagged = sum(1 for r in results if r.get("uncertain"))
        if flagged:
            self.uncertain.inc(flagged)


class CompareMetrics:
    """`/v1/compare`: answers, and those where the ensemble and the student disagree on top-1
    (disagreement rate = rate(disagreements) / rate(compares))."""

    def __init__(self) -> None:
        self.compares = Counter("flowers_compare_requests", description="/v1/compare requests answered")
        self.disagreements = Counter("flowers_compare_disagreements",
                                     description="/v1/compare requests where ensemble and student top-1 differ")

    def record(self, agree: bool) -> None:
        self.compares.inc()
        if not agree:
            self.disagreements.inc()


class ExplainMetrics:
    """`/v1/explain/{model}`: Grad-CAM maps made, per model, and requests turned away while the explainer was busy."""

    def __init__(self) -> None:
        self.explanations = Counter("flowers_explanations", description="Grad-CAM explanations answered",
                                    tag_keys=("model",))
        self.busy = Counter("flowers_explain_rejected", description="explain requests answered 503 (queue full)")

    def record(self, model: str) -> None:
        self.explanations.inc(tags={"model": model})

    def reject(self) -> None:
        self.busy.inc()


class ShadowMetrics:
    """Shadow copies per (primary, shadow) version pair: compared, agreeing on top-1, the summed mean
    |Δp|, skipped while the replica was busy, and each side's time (agreement rate =
    rate(agreements) / rate(compared); mean |Δp| = rate(abs_prob_diff_sum) / rate(compared))."""

    TAGS = ("model", "primary", "shadow")

    def __init__(self, role: str) -> None:
        self.compared = Counter("flowers_shadow_compared", description="shadow copies compared with the answer",
                                tag_keys=self.TAGS)
        self.agreements = Counter("flowers_shadow_top1_agreements",
                                  description="shadow copies whose top-1 class equals the answer's", tag_keys=self.TAGS)
        self.abs_diff = Counter("flowers_shadow_abs_prob_diff_sum",
                                description="sum over copies of the mean |p_primary - p_shadow| over classes",
                                tag_keys=self.TAGS)
        self.skipped = Counter("flowers_shadow_skipped", description="copies not sent: shadow queue full or failed",
                               tag_keys=self.TAGS)
        self.latency = Histogram("flowers_shadow_latency_ms", description="forward-pass time per side (ms)",
                                 boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000],
                                 tag_keys=(*self.TAGS, "side"))
        for m in (self.compared, self.agreements, self.abs_diff, self.skipped, self.latency):
            m.set_default_tags({"model": role})

    def record(self, primary: str | None, shadow: str | None, agree: bool, abs_diff: float, primary_ms: float,
               shadow_ms: float) -> None:
        tags = {"primary": str(primary), "shadow": str(shadow)}
        self.compared.inc(tags=tags)
        if agree:
            self.agreements.inc(tags=tags)
        if abs_diff > 0:  # a Ray counter takes positive increments only
            self.abs_diff.inc(abs_diff, tags=tags)
        self.latency.observe(primary_ms, tags={**tags, "side": "primary"})
        self.latency.observe(shadow_ms, tags={**tags, "side": "shadow"})

    def skip(self, primary: str | None, shadow: str | None) -> None:
        self.skipped.inc(tags={"primary": str(primary), "shadow": str(shadow)})
