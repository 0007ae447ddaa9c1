"""The one retention rule every target keeps (replica/retention.py): latest, hourly at the hour boundaries,
application-consistent points within the kept hours."""
from replicator.replica.retention import keep_points, snapshots_needed

H = 3600


def test_latest_hourly_and_application_points():
    pts = [(0, "crash"), (600, "application"), (1200, "crash"), (H + 10, "crash"), (2 * H + 5, "application"),
           (2 * H + 100, "crash"), (3 * H, "crash")]
    assert keep_points(pts, 0) == {6: "latest"}
    assert keep_points(pts, 2) == {6: "latest", 5: "hourly", 4: "app", 3: "hourly"}
    assert keep_points(pts, 24) == {6: "latest", 5: "hourly", 4: "app", 3: "hourly", 2: "hourly", 1: "app"}
    assert keep_points([], 3) == {}


def test_a_day_of_half_minute_cycles_fits_the_bound():
    pts = [(t, "application" if t % (4 * H) == 0 else "crash") for t in range(0, 30 * H, 30)]
    kept = keep_points(pts, 24)
    assert sum(1 for k in kept.values() if k == "hourly") == 24
    hours = sorted({int(pts[i][0] // H) for i, k in kept.items() if k == "hourly"})
    assert hours == list(range(5, 29))                 # the 24 hours before the latest's
    for i, k in kept.items():
        if k == "hourly":
            assert int(pts[i + 1][0] // H) != int(pts[i][0] // H)      # the last point of its hour
    assert len(kept) <= snapshots_needed(24)
    assert all(pts[i][1] == "application" for i, k in kept.items() if k == "app")
