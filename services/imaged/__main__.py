"""Entry point: python -m services.imaged --config pyrio.toml"""

from common.daemon import run_service
from services.imaged.service import build

if __name__ == "__main__":
    run_service("imaged", build)
