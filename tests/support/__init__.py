"""Development tooling: the demo, a vLLM process driver and the tiny test checkpoint."""
