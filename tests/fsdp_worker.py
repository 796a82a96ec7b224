"""Entry point of the 2-process runs of tests/test_fsdp.py (launched with LOCAL_RANK/WORLD_SIZE set, so
Lightning treats the processes as externally created): ``python tests/fsdp_worker.py OUT MODE NAME...``:
MODE "ddp" runs the equality runs NAME..., "fsdp" runs them and then the resume, sample-folder and BMA runs
(``worker_extra``), "extra" only the latter."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsdp_helpers import worker_extra, worker_main  # noqa: E402

if __name__ == "__main__":
    out, mode, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode in ("fsdp", "ddp"):
        worker_main(out, mode, names)
    if mode == "fsdp" or mode == "extra":
        worker_extra(out)
