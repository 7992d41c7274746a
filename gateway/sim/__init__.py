"""``maas sim``: a vLLM-compatible OpenAI server with deterministic output, for tests, benchmarks and the demo."""
