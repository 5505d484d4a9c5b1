"""Core ML (iOS 18 / macOS 15): the exporter, the numpy MIL executor, the runner, verification."""
