"""Paper reproductions: one module per experiment, plus shared run-folder helpers (`common`).

Only this package and :mod:`dcem.cli` touch the file system or parse options; the
library modules (`dcem.lml`, `dcem.optim`, `dcem.control`, ...) know nothing of them.
"""
