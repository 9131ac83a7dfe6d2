"""weightlab: look inside model checkpoints and operate on them.

The command line (`weightlab --help`) is a thin layer over this package:
`weightlab.io` (checkpoints in and out), `weightlab.analysis` (spectrum, angles, gaussian, tsd),
`weightlab.merge`, `weightlab.surgery` (LoRA init and extraction), `weightlab.report`.
"""

import os

__version__ = "0.1.0"

# Idle math threads sleep instead of spinning: on a machine other work is using, spinning threads
# burnt 8x the CPU time of the same work (benchmarks/bench_load.py). Set before torch and scipy
# load their OpenMP and OpenBLAS runtimes; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # OpenBLAS's smallest spin (2^4 cycles) before sleeping
