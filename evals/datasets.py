"""`python -m evals.datasets <layout>:<root>`: the documented dataset summary (the loaders live in
scans.datasets)."""

from scans.dataset_summary import main

if __name__ == "__main__":
    raise SystemExit(main())
