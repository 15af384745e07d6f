"""Prefect flows: the schedulable shape of the Motus recipe. No ML logic lives here; see motus/pipeline."""
