"""Speed and memory figures, one JSON line each: run each script as a module from the root (python -m bench.cache)."""
