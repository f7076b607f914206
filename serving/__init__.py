"""What the prefill and decode services share: the supervised engine loop and the Prometheus metrics."""
