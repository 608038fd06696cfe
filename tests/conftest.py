"""tests/parallel/ holds tests that run inside every rank of a launched job; the plain pytest run
collects only their drivers (test_parallel.py), never the rank-side files themselves."""
import os

collect_ignore = [] if os.environ.get("HVDTRAIN_RANK_TESTS") == "1" else ["parallel"]
