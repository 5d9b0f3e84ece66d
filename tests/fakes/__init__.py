"""Strict in-process fakes of external systems, for tests that cannot run the real thing here."""
