"""KV handoff from prefill to decode: the message, its checks, and the transports."""
