"""HTTP layer: wire schemas, routes and the error handlers; no tensors in here."""
