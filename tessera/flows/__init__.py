"""Prefect flows: parameters in, stage calls, artifacts out. The stages work without Prefect."""
import os

# Prefect reads its settings once, when first imported: set these defaults before that.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A busy machine can take longer than Prefect's default 20 s to start the ephemeral API server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
