"""
Runs every end-to-end test file in one go with one summary line.

Run: KL_BUILD_DIR=build python3 tests/e2e/run_all.py [name-substring...]
"""

import os
import sys

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import test_durability  # noqa: E402
import test_keys  # noqa: E402
import test_tools  # noqa: E402


def main():
    tests = []
    for mod in (test_tools, test_keys, test_durability):
        tests += h.collect(vars(mod), mod.__name__ + ".")
    try:
        rc = h.run_tests(tests, sys.argv[1:])
    finally:
        h.cleanup_all()
    sys.exit(rc)


if __name__ == "__main__":
    main()
