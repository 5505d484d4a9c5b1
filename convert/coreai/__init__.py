"""Core AI (OS 27): the exporter, Apple's runtime behind the shared runner, and verification."""
