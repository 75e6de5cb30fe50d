"""Entry point: python -m services.shimd --config pyrio.toml"""

from common.daemon import run_service
from services.shimd.service import build

if __name__ == "__main__":
    run_service("shimd", build)
