"""ScalingHistory: the memory behind HPA `behavior`, and the two rules that read it.

Kept exactly as the HorizontalPodAutoscaler controller keeps it (pkg/controller/
podautoscaler/horizontal.go), so a CapacityPolicy's `behavior` means what it means
on an HPA:

* stabilization: a scale-up goes only as high as the *lowest* recommendation within
  the scale-up window, a scale-down only as low as the *highest* within the scale-down
  window; the window includes the recommendation being made now;
* rate limits: each policy allows, from the replica count at the start of its period
  (now minus the changes made within the period), `+value` pods or `+value` percent
  (rounded up) when scaling up, `-value` / `-value` percent (rounded down) when
  scaling down (integer arithmetic, where the controller's float product can round
  10 * 1.1 up to 12); `selectPolicy` Max takes the policy allowing the larger change, Min
  the smaller, Disabled allows none.

"Within" is strict, as in the controller: an entry exactly `window` seconds old no
longer counts. The history is immutable; each step returns a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

from operators.pool_policy import Behavior, PolicyType, ScalingRules, SelectPolicy


@dataclass(frozen=True)
class Verdict:
    replicas: int
    reason: str
    message: str


@dataclass(frozen=True)
class ScalingHistory:
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, raw recommendation)
    scale_events: tuple[tuple[float, int], ...] = ()  # (time, +added / -removed)

    def seeded(self, now: float, current: int) -> ScalingHistory:
        """A fresh history remembers the current size, so a new (or restarted) policy
        does not scale down before a whole scale-down window has been observed."""
        if self.recommendations:
            return self
        return ScalingHistory(((now, current),), self.scale_events)

    def recommended(self, now: float, replicas: int, horizon: float) -> ScalingHistory:
        kept = tuple(r for r in self.recommendations if r[0] > now - horizon)
        return ScalingHistory((*kept, (now, replicas)), self.scale_events)

    def scaled(self, now: float, old: int, new: int, horizon: float) -> ScalingHistory:
        """Record a resize that was applied to the target."""
        kept = tuple(e for e in self.scale_events if e[0] > now - horizon)
        if new == old:
            return ScalingHistory(self.recommendations, kept)
        return ScalingHistory(self.recommendations, (*kept, (now, new - old)))

    def stabilize(self, behavior: Behavior, now: float, current: int, desired: int) -> Verdict:
        """Apply the stabilization windows to `desired` (already recorded)."""
        up_cutoff = now - behavior.scale_up.stabilization_window_seconds
        down_cutoff = now - behavior.scale_down.stabilization_window_seconds
        up, down = desired, desired
        for at, replicas in self.recommendations:
            if at > up_cutoff:
                up = min(up, replicas)
            if at > down_cutoff:
                down = max(down, replicas)
        stabilized = min(max(current, up), down)
        if stabilized == desired:
            return Verdict(stabilized, "ReadyForNewScale", "recommended size matches current size")
        if desired >= current:
            return Verdict(
                stabilized,
                "ScaleUpStabilized",
                "recent recommendations were lower than current one, "
                "applying the lowest recent recommendation",
            )
        return Verdict(
            stabilized,
            "ScaleDownStabilized",
            "recent recommendations were higher than current one, "
            "applying the highest recent recommendation",
        )

    def limit(
        self, behavior: Behavior, now: float, current: int, desired: int, bounds: tuple[int, int]
    ) -> Verdict:
        """Apply the step policies and min/max to a stabilized `desired`."""
        low, high = bounds
        if desired > current:
            step = max(self._up_limit(behavior.scale_up, now, current), current)
            if step < high:
                cap, reason, message = (
                    step,
                    "ScaleUpLimit",
                    "the desired replica count is increasing faster than the maximum scale rate",
                )
            else:
                cap, reason, message = (
                    high,
                    "TooManyReplicas",
                    "the desired replica count is more than the maximum replica count",
                )
            if desired > cap:
                return Verdict(cap, reason, message)
        elif desired < current:
            step = min(self._down_limit(behavior.scale_down, now, current), current)
            if step > low:
                floor, reason, message = (
                    step,
                    "ScaleDownLimit",
                    "the desired replica count is decreasing faster than the maximum scale rate",
                )
            else:
                floor, reason, message = (
                    low,
                    "TooFewReplicas",
                    "the desired replica count is less than the minimum replica count",
                )
            if desired < floor:
                return Verdict(floor, reason, message)
        # A target resized outside the bounds by hand comes back at once, as with an HPA.
        if desired > high:
            return Verdict(high, "TooManyReplicas", "the current replica count exceeds maxReplicas")
        if desired < low:
            return Verdict(low, "TooFewReplicas", "the current replica count is below minReplicas")
        return Verdict(
            desired, "DesiredWithinRange", "the desired count is within the acceptable range"
        )

    def _period_start(self, period_seconds: int, now: float, current: int) -> int:
        cutoff = now - period_seconds
        changed = sum(change for at, change in self.scale_events if at > cutoff)
        return current - changed

    def _up_limit(self, rules: ScalingRules, now: float, current: int) -> int:
        if rules.select_policy is SelectPolicy.DISABLED:
            return current
        proposals = []
        for policy in rules.policies:
            start = self._period_start(policy.period_seconds, now, current)
            if policy.type is PolicyType.PODS:
                proposals.append(start + policy.value)
            else:
                proposals.append(-(-start * (100 + policy.value) // 100))  # exact ceil
        return max(proposals) if rules.select_policy is SelectPolicy.MAX else min(proposals)

    def _down_limit(self, rules: ScalingRules, now: float, current: int) -> int:
        if rules.select_policy is SelectPolicy.DISABLED:
            return current
        proposals = []
        for policy in rules.policies:
            start = self._period_start(policy.period_seconds, now, current)
            if policy.type is PolicyType.PODS:
                proposals.append(start - policy.value)
            else:
                proposals.append(start * (100 - policy.value) // 100)
        # the largest change down is the smallest count
        return min(proposals) if rules.select_policy is SelectPolicy.MAX else max(proposals)
