"""Prefect flows: parameters in, stage calls, artifacts out. The stages work without Prefect."""
