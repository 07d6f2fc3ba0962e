"""`python -m tools.pointmae_train`: the documented command for pretraining a Point-MAE backbone.

The training lives in detector.pointmae_train. This entry point only hands the command line over, by module
name
and only when run as a script, so that importing `tools` never loads torch or the detector
(tests/test_layout.py).
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("detector.pointmae_train", run_name="__main__", alter_sys=True)
