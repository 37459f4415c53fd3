import logging
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Prefect's API log handler may outlive its temporary server at exit; do not print its complaint.
logging.raiseExceptions = False

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
IN_NETNS = os.environ.get("TESSERA_IN_NETNS") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked `netns` name non-loopback addresses: they run only inside the fresh
    network namespace that tests/test_netns.py creates, never on the host network."""
    for item in items:
        if "netns" in item.keywords and not IN_NETNS:
            item.add_marker(pytest.mark.skip(
                reason="runs inside a fresh network namespace, through tests/test_netns.py"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from tessera.config.ray import RayConfig
    from tessera.core.raytools import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def reference_file(name: str) -> Path:
    """A file from the shared reference folder, or skip with the reason when it is absent."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference file {name} is not available at {REFERENCE} (it sits beside the repo in CI)")
    return path


sys.path.insert(0, str(REPO))


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
