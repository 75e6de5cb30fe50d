"""Entry point: python -m services.netd --config pyrio.toml"""

from common.daemon import run_service
from services.netd.service import build

if __name__ == "__main__":
    run_service("netd", build)
