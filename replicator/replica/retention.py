"""Which recovery points a replica keeps: one rule for every target (the local store, Azure page blobs),
so a machine has the same points wherever it is replicated.

The latest point always; for each of the `additional_points` most recent earlier hours that have points,
the last point of that hour (the one at the hour's boundary); and, within those same hours, the last
application-consistent point of each hour too, when it is not already that hour's last point (the
scheduler takes application-consistent points on hourly ticks every `app_consistent_hours`, so they are
kept at their own frequency instead of being replaced by the crash-consistent cycles after them).
"""
from __future__ import annotations

from collections.abc import Sequence

HOUR = 3600
LATEST, HOURLY, APP = "latest", "hourly", "app"


def keep_points(points: Sequence[tuple[float, str]], additional_points: int) -> dict[int, str]:
    """`points`: (time, consistency) oldest first. Returns {index: why kept} with why one of "latest",
    "hourly", "app"; every other index is expired."""
    if not points:
        return {}
    last = len(points) - 1
    keep = {last: LATEST}
    hours: list[int] = []
    app_hours: set[int] = set()
    latest_hour = int(points[last][0] // HOUR)
    for i in range(last - 1, -1, -1):
        t, consistency = points[i]
        hour = int(t // HOUR)
        if hour != int(points[i + 1][0] // HOUR) and len(hours) < additional_points:
            hours.append(hour)
            keep[i] = HOURLY
        elif (consistency == "application" and hour not in app_hours and additional_points
              and (hour in hours or hour == latest_hour) and i not in keep):
            app_hours.add(hour)
            keep[i] = APP
        if consistency == "application" and i in keep:
            app_hours.add(hour)
    return keep


def snapshots_needed(additional_points: int, extra: int = 0) -> int:
    """The most points the rule can keep at once (latest, one hourly and one application-consistent point
    per hour, the latest's hour included), plus `extra` kept besides them: what a target with a per-disk cap
    must fit."""
    return (2 + 2 * additional_points if additional_points else 1) + extra
