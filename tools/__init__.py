"""The agent's tools: calculator, storage and python. Each is usable without the runtime."""
