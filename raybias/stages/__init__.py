"""Pipeline stages: each module has one entry function `run_<stage>(cfg, run, mode)`."""
