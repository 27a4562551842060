"""The JAX rollout server (SGLang's HTTP protocol over the embedded JAX engine).

    python launch/serve.py --checkpoint DIR [--host 127.0.0.1] [--port N] [--api-key K] [--num-slots N] ...
    python launch/serve.py --checkpoint DIR --mesh tensor:4,expert:2 ...   # one node's 8 devices

Prints ``ready: serving http://HOST:PORT (...)`` once it answers requests; a bad start ends in one
``error: ...`` line with the project's exit code (2 config, 3 missing file, 5 checkpoint, 6 rollout
server). See :mod:`cascade_jax.rollout.server` for the endpoints and ``--help`` for the flags.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cascade_jax.rollout.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
