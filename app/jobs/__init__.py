"""Training jobs: asked for over HTTP, queued in Redis, run by `rnnserve worker` outside the serving processes."""
