"""Entry point: python -m services.shimd --config pyrio.toml"""

# The shim zygote is forked before anything else is imported or any thread
# started, so the shims it forks share a small, single-threaded interpreter.
from services.shimd import zygote

zygote.start()

from common.daemon import run_service  # noqa: E402
from services.shimd.service import build  # noqa: E402

if __name__ == "__main__":
    run_service("shimd", build)
