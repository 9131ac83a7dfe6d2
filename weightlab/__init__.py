"""weightlab: look inside model checkpoints and operate on them.

The command line (`weightlab --help`) is a thin layer over this package:
`weightlab.io` (checkpoints in and out), `weightlab.analysis` (spectrum, angles, gaussian, tsd),
`weightlab.merge`, `weightlab.surgery` (LoRA init and extraction), `weightlab.report`.
"""

__version__ = "0.1.0"
