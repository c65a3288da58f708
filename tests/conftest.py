import sys
from pathlib import Path

# Test helpers (streams.py, helpers_tcp.py, engine_helpers.py, statuses.py) import by name.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_report_header() -> str:
    import sapd_nfq

    return f"engine: {sapd_nfq.ENGINE}"
