"""`metald billing-sink`: a billing.v1.BillingService of our own, for the quick start and
the tests (and any host without the existing billaged).

It speaks billaged's API (package, paths, fields, the X-Tenant-ID rule) on Connect, gRPC and
gRPC-Web, and unlike billaged it keeps what it receives in SQLite (`store`): every sample
once (a duplicate by (vm_id, sample instant) is dropped: metald delivers at least once), the
started, stopped and gap notices and the heartbeats. `metald billing usage` reads that file
and bills it with core/metering.py's rule (billaged's positive deltas).
"""
