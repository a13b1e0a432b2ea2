"""Names fixed by the contract of the metrics snapshot, shared by the tests that check them."""

# The keys every metrics snapshot carries, at least.
SNAPSHOT_KEYS = frozenset(
    {
        "submitted",
        "succeeded",
        "failed",
        "duplicates",
        "retries",
        "rejected",
        "cancelled",
        "in_flight",
        "queue_depth",
        "max_queue_depth",
        "workers",
        "queue_size",
        "elapsed_seconds",
        "throughput_per_second",
        "success_rate",
        "utilization",
        "latency_ms",
        "queue_wait_ms",
        "service_ms",
    }
)
