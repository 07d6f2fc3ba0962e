"""`python -m evals.bench`: the documented command for building the dev benchmark (the builder lives in
scans.bench)."""

from scans.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
