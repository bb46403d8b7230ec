"""Glimpse beyond one machine, on a Ray cluster (the optional `ray` extra: `pip install glimpse-vl[ray]`).

- `batch`: `glimpse extract|video ... --ray [ADDRESS]` and `extract_on_ray` / `analyze_videos_on_ray`:
  Ray Data feeds the inputs to a pool of actors, one Glimpse engine each (one per GPU), and the driver
  streams one JSON line per input; a rerun skips the inputs already done.
- `serve`: `glimpse serve ... --ray-replicas N` and `serve run glimpse.scaleout.serve:app_builder`:
  replicas of the OpenAI-compatible server as a Ray Serve application.
- `cli`: the flags, and the dispatch that loads Ray only when asked for.

Only this package imports Ray; nothing else in Glimpse needs it (docs/RAY.md).
"""
